#!/bin/sh
# Nightly reconciliation of yesterday (UTC) against the upstream, with repair; run by
# meterline-reconcile.cron, whose variables say where things are (the defaults below match).
# Exit status is meterline reconcile's: 0 no drift, 1 drift found (repaired when it could be),
# 2 could not run. cron mails any output of a failing run (set MAILTO in the crontab).
# Tokens come from the environment file, never from the command line (ps would show them):
#   /etc/meterline/reconcile.env (readable by the meterline user only):
#     METERLINE_TOKEN=mlt_oat_...            the forwarded organization's local token
#     METERLINE_UPSTREAM_TOKEN=polar_oat_... the upstream organization's token
#     UPSTREAM_URL=https://api.polar.sh
#     METERLINE_URL=http://127.0.0.1:8000    optional: the local meterline
set -eu
prefix=${METERLINE_PREFIX:-/opt/meterline}
reports=${METERLINE_REPORTS:-/var/lib/meterline/reconcile}
. "${METERLINE_RECONCILE_ENV:-/etc/meterline/reconcile.env}"
export METERLINE_TOKEN METERLINE_UPSTREAM_TOKEN
day=$(date -u -d yesterday +%F)
mkdir -p "$reports"
exec "$prefix/venv/bin/meterline" reconcile \
  --from "${day}T00:00:00Z" --to "$(date -u +%F)T00:00:00Z" \
  --url "${METERLINE_URL:-http://127.0.0.1:8000}" --upstream-url "$UPSTREAM_URL" \
  --mode "${FORWARD_MODE:-raw}" --rate "${UPSTREAM_RATE:-200}" \
  --report "$reports/$day.json" --repair
