#!/bin/sh
# Usage events to meterline's topic from the command line with kcat: one JSON record a line,
# keyed "<organization>/ext:<customer>" (the key before the tab) and partitioned by CRC-32 of
# the key, as the edges do, so that a customer's events stay in order. kcat on librdkafka 2.0
# (Debian 12's) cannot read the ApiVersions answer of some non-Apache brokers (Tansu): use one
# linked with a newer librdkafka there (2.16 works; the tests run it so).
set -eu
for i in 1 2 3; do
  printf '%s/ext:cust_%s\t{"organization_id": "%s", "name": "api_call",' \
    "$METERLINE_ORG_ID" "$((i % 2))" "$METERLINE_ORG_ID"
  printf ' "external_customer_id": "cust_%s", "external_id": "kcat-%s", "metadata": {"tokens": %s}}\n' \
    "$((i % 2))" "$i" "$((10 * i))"
done | kcat -P -b "${METERLINE_KAFKA:-127.0.0.1:9092}" -t "${METERLINE_TOPIC:-meterline.events}" \
  -K '\t' -X partitioner=consistent -X acks=all
