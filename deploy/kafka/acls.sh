#!/bin/sh
# Kafka ACLs for meterline: only the ingest edges, the core and the producers named in
# TRUSTED_PRODUCERS may write the events topic; only the core reads it.
#
# Why: a record names its organization itself (`organization_id`), so write access to the
# events topic is full trust for every organization: any producer that can write it can write
# any organization's events. Untrusted tenants send through the edges (POST /v1/events/ingest),
# whose token fixes the organization; direct producers are for systems you trust with all of it.
#
# What the broker needs for these to mean anything:
#   - clients authenticated (SASL or mTLS listeners), so that the principals below are who they
#     say: start the core with `--kafka-security-protocol SASL_SSL --kafka-sasl-username
#     meterline-core` and the edges with `... --kafka-sasl-username meterline-edge` (the
#     password from --kafka-sasl-password-file or METERLINE_KAFKA_SASL_PASSWORD), or give them
#     client certificates with those names (--kafka-cert-file, --kafka-key-file; the broker's
#     ssl.principal.mapping.rules decide the principal); on a PLAINTEXT listener, as in
#     deploy/docker-compose.yml, every client is User:ANONYMOUS and no ACL can tell them apart;
#   - an authorizer (KRaft: authorizer.class.name=
#     org.apache.kafka.metadata.authorizer.StandardAuthorizer) with
#     allow.everyone.if.no.acl.found=false (its default): what no ACL below allows is denied,
#     which is how everyone else is kept out. No explicit DENY is added: in Kafka a DENY wins over
#     every ALLOW, so a DENY for User:* would lock out the principals allowed here too.
#
# Run once from a host that reaches the brokers as an admin principal, e.g.
#   BOOTSTRAP=kafka:9093 ADMIN_CONFIG=admin.properties \
#     TRUSTED_PRODUCERS="User:billing-exporter User:batch-loader" sh deploy/kafka/acls.sh
# The names below are meterline's defaults (`--topic`, `--dead-letter-topic`,
# `--consumer-group`, after which the cores' lease group is named, as the control, journal and
# lease topics are after the events topic); pass the same values if the core runs with others.
set -eu

BOOTSTRAP="${BOOTSTRAP:-kafka:9092}"
ADMIN_CONFIG="${ADMIN_CONFIG:-admin.properties}"
KAFKA_ACLS="${KAFKA_ACLS:-/opt/kafka/bin/kafka-acls.sh}"
TOPIC="${TOPIC:-meterline.events}"
DEAD_LETTER_TOPIC="${DEAD_LETTER_TOPIC:-meterline.events.dead}"
CONTROL_TOPIC="$TOPIC.control"
JOURNAL_TOPIC="$TOPIC.journal"
LEASE_TOPIC="$TOPIC.lease"
CONSUMER_GROUP="${CONSUMER_GROUP:-meterline-core}"
EDGE_PRINCIPAL="${EDGE_PRINCIPAL:-User:meterline-edge}"
CORE_PRINCIPAL="${CORE_PRINCIPAL:-User:meterline-core}"
# Space-separated principals of direct producers trusted with every organization's events.
TRUSTED_PRODUCERS="${TRUSTED_PRODUCERS:-}"

acl() {
    "$KAFKA_ACLS" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add "$@"
}

# Edges and the core create the topics at start if missing (with the configured partitions),
# publish to the events topic (the core publishes its own ingest endpoint's events), and read
# organizations and tokens from the control topic.
for principal in "$EDGE_PRINCIPAL" "$CORE_PRINCIPAL"; do
    acl --allow-principal "$principal" --operation Create --operation Describe \
        --operation Write --topic "$TOPIC"
    acl --allow-principal "$principal" --operation Create --operation Describe \
        --topic "$DEAD_LETTER_TOPIC"
    acl --allow-principal "$principal" --operation Create --operation Describe \
        --operation Read --topic "$CONTROL_TOPIC"
    acl --allow-principal "$principal" --operation Create --operation Describe \
        --topic "$JOURNAL_TOPIC"
    acl --allow-principal "$principal" --operation Create --operation Describe \
        --topic "$LEASE_TOPIC"
    # The idempotent producer (on unless --no-idempotence).
    acl --allow-principal "$principal" --operation IdempotentWrite --cluster
done

# The cores: the one that leads (the member of their consumer group holding the lease topic's
# partition) reads the events topic; it writes dead letters and reads them back
# (GET /v1/dead-letters/, without a group).
acl --allow-principal "$CORE_PRINCIPAL" --operation Read --topic "$TOPIC"
acl --allow-principal "$CORE_PRINCIPAL" --operation Read --group "$CONSUMER_GROUP.lease"
# Every core sends heartbeats to the lease topic and reads the others' (GET /v1/cluster/).
acl --allow-principal "$CORE_PRINCIPAL" --operation Write --operation Read --topic "$LEASE_TOPIC"
acl --allow-principal "$CORE_PRINCIPAL" --operation Write --operation Read \
    --topic "$DEAD_LETTER_TOPIC"
# ... and the one writer of API write records (`meterline token create --kafka` runs as it) and
# of the journal, which it reads back at start.
acl --allow-principal "$CORE_PRINCIPAL" --operation Write --topic "$CONTROL_TOPIC"
acl --allow-principal "$CORE_PRINCIPAL" --operation Write --operation Read \
    --topic "$JOURNAL_TOPIC"

# Trusted producers: write the events topic, nothing else (they do not create topics).
for principal in $TRUSTED_PRODUCERS; do
    acl --allow-principal "$principal" --operation Describe --operation Write --topic "$TOPIC"
    acl --allow-principal "$principal" --operation IdempotentWrite --cluster
done
