"""The DuckDB schema, created and migrated in numbered steps.

Each step runs once, in order, inside a transaction, and is recorded in `schema_migrations`.
Never edit a released step: add a new one.
"""

from __future__ import annotations

import duckdb

from aggregator.store.base.rows import transaction

MIGRATIONS: tuple[str, ...] = (
    # 1: events (deduplicated by external_id), parent links, customer first events, customers.
    """
    CREATE TABLE events (
        id UUID NOT NULL DEFAULT uuidv7(),
        seq BIGINT NOT NULL,                 -- ingestion order, unique per store
        organization_id UUID NOT NULL,
        name VARCHAR NOT NULL,
        source VARCHAR NOT NULL DEFAULT 'user',
        timestamp TIMESTAMPTZ NOT NULL,      -- the client's time (charts, quantities)
        ingested_at TIMESTAMPTZ NOT NULL,    -- the server's time (billing windows)
        customer_id UUID,
        external_customer_id VARCHAR,
        external_member_id VARCHAR,
        external_id VARCHAR,
        parent_id VARCHAR,
        metadata JSON NOT NULL,
        cost_amount DECIMAL(17, 12),         -- _cost.amount in cents, exact
        -- (organization_id, external_id) is unique forever: the first write wins.
        UNIQUE (organization_id, external_id)
    );
    -- Direct children per parent reference (an event id or an external_id).
    CREATE TABLE event_children (
        organization_id UUID NOT NULL,
        parent_ref VARCHAR NOT NULL,
        children BIGINT NOT NULL,
        PRIMARY KEY (organization_id, parent_ref)
    );
    -- First event time per customer reference, kept up to date by ingest.
    CREATE TABLE event_subjects (
        organization_id UUID NOT NULL,
        subject VARCHAR NOT NULL,            -- 'id:<customer uuid>' or 'ext:<external id>'
        first_timestamp TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (organization_id, subject)
    );
    CREATE TABLE customers (
        id UUID PRIMARY KEY,
        organization_id UUID NOT NULL,
        type VARCHAR NOT NULL,
        email VARCHAR,
        name VARCHAR,
        external_id VARCHAR,
        billing_address JSON,
        tax_id JSON,
        locale VARCHAR,
        metadata JSON NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        modified_at TIMESTAMPTZ
    );
    """,
    # 2: meters and their rollups.
    """
    CREATE TABLE meters (
        id UUID PRIMARY KEY,
        organization_id UUID NOT NULL,
        name VARCHAR NOT NULL,
        unit VARCHAR NOT NULL,
        custom_label VARCHAR,
        custom_multiplier BIGINT,
        filter JSON NOT NULL,
        aggregation JSON NOT NULL,
        metadata JSON NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        modified_at TIMESTAMPTZ,
        archived_at TIMESTAMPTZ,
        version INTEGER NOT NULL DEFAULT 1,      -- bumped when filter or aggregation changes
        backfill_target BIGINT NOT NULL,         -- events with seq <= target need backfill
        backfilled_to BIGINT NOT NULL DEFAULT 0  -- ... and those up to here are done
    );
    -- Mergeable partial aggregates per meter, customer reference and 15-minute UTC bucket
    -- (every IANA offset in use is a multiple of 15 minutes, so any timezone's hour, day,
    -- week, month and year boundaries fall on bucket boundaries).
    CREATE TABLE rollups (
        meter_id UUID NOT NULL,
        subject VARCHAR NOT NULL,                -- 'id:<customer uuid>' or 'ext:<external id>'
        bucket TIMESTAMPTZ NOT NULL,
        events BIGINT NOT NULL,
        total DOUBLE NOT NULL,
        low DOUBLE NOT NULL,
        high DOUBLE NOT NULL,
        PRIMARY KEY (meter_id, subject, bucket)
    );
    -- Exact distinct values for unique meters, per bucket.
    CREATE TABLE rollup_values (
        meter_id UUID NOT NULL,
        subject VARCHAR NOT NULL,
        bucket TIMESTAMPTZ NOT NULL,
        value VARCHAR NOT NULL,
        PRIMARY KEY (meter_id, subject, bucket, value)
    );
    """,
    # 3: how far the consumer has applied each Kafka partition (written with the events).
    """
    CREATE TABLE kafka_offsets (
        topic VARCHAR NOT NULL,
        partition INTEGER NOT NULL,
        next_offset BIGINT NOT NULL,
        PRIMARY KEY (topic, partition)
    );
    """,
    # 4: the credit ledger. A customer meter's window is the user events applied after its
    # latest reset (seq order); usage is kept per customer reference, like rollups.
    """
    CREATE TABLE ledger_usage (
        meter_id UUID NOT NULL,
        subject VARCHAR NOT NULL,
        events BIGINT NOT NULL,
        total DOUBLE NOT NULL,
        low DOUBLE NOT NULL,
        high DOUBLE NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        modified_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (meter_id, subject)
    );
    CREATE TABLE ledger_usage_values (
        meter_id UUID NOT NULL,
        subject VARCHAR NOT NULL,
        value VARCHAR NOT NULL,
        PRIMARY KEY (meter_id, subject, value)
    );
    -- Credits as non-negative running sums since the latest reset: all of them, and those
    -- granted with and without rollover (what a reset may carry over).
    CREATE TABLE customer_meters (
        id UUID PRIMARY KEY,
        organization_id UUID NOT NULL,
        customer_id UUID NOT NULL,
        meter_id UUID NOT NULL,
        credited BIGINT NOT NULL DEFAULT 0,
        credited_rollover BIGINT NOT NULL DEFAULT 0,
        credited_plain BIGINT NOT NULL DEFAULT 0,
        reset_seq BIGINT NOT NULL DEFAULT 0,
        created_at TIMESTAMPTZ NOT NULL,
        modified_at TIMESTAMPTZ NOT NULL,
        UNIQUE (customer_id, meter_id)
    );
    CREATE TABLE credit_plans (
        id UUID PRIMARY KEY,
        organization_id UUID NOT NULL,
        external_id VARCHAR NOT NULL,
        customer_id UUID NOT NULL,
        meter_id UUID NOT NULL,
        units BIGINT NOT NULL,
        interval VARCHAR NOT NULL,
        rollover BOOLEAN NOT NULL,
        starts_at TIMESTAMPTZ NOT NULL,
        cycles BIGINT NOT NULL DEFAULT 0,        -- boundaries processed so far
        next_cycle_at TIMESTAMPTZ NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        deleted_at TIMESTAMPTZ,
        UNIQUE (organization_id, external_id)
    );
    """,
    # 5: forwarding upstream. The events table is the outbox: a cursor per organization says
    # how far (by seq) its user events were accepted upstream; refused ones are quarantined.
    """
    CREATE TABLE forward_cursors (
        organization_id UUID PRIMARY KEY,
        cursor BIGINT NOT NULL,
        sent BIGINT NOT NULL,
        modified_at TIMESTAMPTZ NOT NULL
    );
    CREATE TABLE forward_quarantine (
        organization_id UUID NOT NULL,
        seq BIGINT NOT NULL,
        reason VARCHAR NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (organization_id, seq)
    );
    """,
    # 6: rollup-mode forwarding. Per meter, customer reference and period, the total the
    # outbox already holds; each change is a new revision (an event with a deterministic
    # external_id, frozen here before it is sent) carrying the difference.
    """
    CREATE TABLE forward_rollups (
        organization_id UUID NOT NULL,
        meter_id UUID NOT NULL,
        subject VARCHAR NOT NULL,
        period TIMESTAMPTZ NOT NULL,
        units DOUBLE NOT NULL,
        events BIGINT NOT NULL,
        revision INTEGER NOT NULL,
        PRIMARY KEY (organization_id, meter_id, subject, period)
    );
    CREATE TABLE forward_rollup_outbox (
        organization_id UUID NOT NULL,
        seq BIGINT NOT NULL,
        event JSON NOT NULL,                 -- exactly what is sent, every time
        created_at TIMESTAMPTZ NOT NULL,
        sent_at TIMESTAMPTZ,
        reason VARCHAR,                      -- set when the upstream refused it (quarantine)
        PRIMARY KEY (organization_id, seq)
    );
    """,
    # 7: meters that cannot be evaluated (a definition DuckDB refuses, or one stored before
    # property paths were checked). Live ingest skips a meter whose failure names its current
    # version; redefining it (a new version) or unarchiving it rebuilds it by backfill.
    """
    CREATE TABLE meter_failures (
        meter_id UUID PRIMARY KEY,
        version INTEGER NOT NULL,
        reason VARCHAR NOT NULL,
        failed_at TIMESTAMPTZ NOT NULL
    );
    """,
    # 8: idempotency keys of credits, resets and plans, out of the events' external_ids (where
    # an event could take a credit's key). Keys used so far come along without a request
    # digest (any request with them is a replay, as before); system events lose their
    # external_id, so no event external_id stays reserved.
    """
    CREATE TABLE idempotency_keys (
        organization_id UUID NOT NULL,
        operation VARCHAR NOT NULL,          -- credit, reset, plan
        key VARCHAR NOT NULL,
        request VARCHAR,                     -- sha256 of the request that first used it
        result JSON,                         -- what that request answered
        created_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (organization_id, operation, key)
    );
    INSERT INTO idempotency_keys
        SELECT organization_id, 'credit', substr(external_id, 18), NULL, NULL, min(ingested_at)
        FROM events WHERE source = 'system' AND name = 'meter.credited'
            AND starts_with(external_id, 'meterline:credit:')
        GROUP BY ALL;
    INSERT INTO idempotency_keys
        SELECT organization_id, 'reset', substr(external_id, 17), NULL, NULL, min(ingested_at)
        FROM events WHERE source = 'system' AND name = 'meter.reset'
            AND starts_with(external_id, 'meterline:reset:')
        GROUP BY ALL;
    INSERT INTO idempotency_keys
        SELECT organization_id, 'plan', external_id, NULL, NULL, created_at FROM credit_plans;
    UPDATE events SET external_id = NULL WHERE source = 'system' AND external_id IS NOT NULL;
    """,
    # 9: the events topic's log lost offsets the core had stored (a topic deleted and
    # recreated, a broker that lost its log): each time the core resumed a partition from the
    # log's start instead.
    """
    CREATE TABLE kafka_offset_resets (
        topic VARCHAR NOT NULL,
        partition INTEGER NOT NULL,
        stored_offset BIGINT NOT NULL,       -- where the core was
        log_start BIGINT NOT NULL,           -- the log it found: [start, end]
        log_end BIGINT NOT NULL,
        vanished BIGINT,                     -- offsets gone unapplied; NULL when unknown
        reset_at TIMESTAMPTZ NOT NULL
    );
    """,
    # 10: rollups and ledger usage as appended deltas (`store.compaction`): ingest appends each
    # batch's partial aggregates to unindexed delta tables, compaction merges them into the
    # keyed tables in its own transactions, and reads go through views over both.
    """
    CREATE TABLE rollup_deltas AS SELECT * FROM rollups LIMIT 0;
    CREATE TABLE rollup_value_deltas AS SELECT * FROM rollup_values LIMIT 0;
    CREATE TABLE ledger_usage_deltas AS SELECT * FROM ledger_usage LIMIT 0;
    CREATE TABLE ledger_usage_value_deltas AS SELECT * FROM ledger_usage_values LIMIT 0;
    CREATE VIEW all_rollups AS SELECT * FROM rollups UNION ALL SELECT * FROM rollup_deltas;
    CREATE VIEW all_rollup_values AS
        SELECT * FROM rollup_values UNION ALL SELECT * FROM rollup_value_deltas;
    CREATE VIEW all_ledger_usage AS
        SELECT * FROM ledger_usage UNION ALL SELECT * FROM ledger_usage_deltas;
    CREATE VIEW all_ledger_usage_values AS
        SELECT * FROM ledger_usage_values UNION ALL SELECT * FROM ledger_usage_value_deltas;
    """,
    # 11: customers looked up by external id (every balance check, every ingest naming one)
    # seek instead of scanning: DuckDB uses a single-column index for an equality.
    """
    CREATE INDEX customers_external_id ON customers (external_id);
    """,
    # 12: the ingest log (`store.ingest_log`, files beside the database) holds embedded ingest
    # requests acknowledged before their events are stored; the flush that stores them records
    # the last request they complete.
    """
    CREATE TABLE ingest_stored (through BIGINT NOT NULL);
    INSERT INTO ingest_stored VALUES (0);
    """,
    # 13: rollups kept sorted by meter, customer and bucket, without a key (`store.compaction`:
    # rewritten with their deltas now and then, so one customer's rows are found by zone maps).
    """
    CREATE TABLE rollups_sorted (
        meter_id UUID NOT NULL,
        subject VARCHAR NOT NULL,
        bucket TIMESTAMPTZ NOT NULL,
        events BIGINT NOT NULL,
        total DOUBLE NOT NULL,
        low DOUBLE NOT NULL,
        high DOUBLE NOT NULL
    );
    INSERT INTO rollups_sorted
        SELECT meter_id, subject, bucket, sum(events), sum(total), min(low), max(high)
        FROM (SELECT * FROM rollups UNION ALL SELECT * FROM rollup_deltas) GROUP BY ALL
        ORDER BY meter_id, subject, bucket;
    DELETE FROM rollup_deltas;
    DROP TABLE rollups;
    ALTER TABLE rollups_sorted RENAME TO rollups;
    CREATE TABLE rollup_values_sorted (
        meter_id UUID NOT NULL,
        subject VARCHAR NOT NULL,
        bucket TIMESTAMPTZ NOT NULL,
        value VARCHAR NOT NULL
    );
    INSERT INTO rollup_values_sorted
        SELECT DISTINCT * FROM
            (SELECT * FROM rollup_values UNION ALL SELECT * FROM rollup_value_deltas)
        ORDER BY meter_id, subject, bucket;
    DELETE FROM rollup_value_deltas;
    DROP TABLE rollup_values;
    ALTER TABLE rollup_values_sorted RENAME TO rollup_values;
    """,
    # 14: deleted customers (Polar's soft deletion), out of `customers`: every read of
    # customers, and their email and external id uniqueness, then leave them out unchanged.
    """
    CREATE TABLE deleted_customers (
        id UUID PRIMARY KEY,
        organization_id UUID NOT NULL,
        type VARCHAR NOT NULL,
        email VARCHAR,
        name VARCHAR,
        external_id VARCHAR,                 -- released for reuse, kept here for support
        billing_address JSON,
        tax_id JSON,
        locale VARCHAR,
        metadata JSON NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        modified_at TIMESTAMPTZ,
        deleted_at TIMESTAMPTZ NOT NULL,
        anonymized BOOLEAN NOT NULL
    );
    """,
    # 15: labels of event types (`store.event_type_tables`). An event name is an event type from
    # its first event on, with an id derived from it; only a label set through the API is kept.
    """
    CREATE TABLE event_types (
        id UUID PRIMARY KEY,
        organization_id UUID NOT NULL,
        name VARCHAR NOT NULL,
        label VARCHAR NOT NULL,
        label_property_selector VARCHAR,
        created_at TIMESTAMPTZ NOT NULL,     -- its first event's ingestion
        modified_at TIMESTAMPTZ NOT NULL,
        UNIQUE (organization_id, name)
    );
    """,
    # 16: holds (`store.hold_tables`): units of a customer meter's balance reserved until the
    # usage event with the same external_id settles them, a release, or expiry. The
    # external_id is the hold's idempotency key too (`idempotency_keys`, operation 'hold').
    """
    CREATE TABLE meter_holds (
        id UUID PRIMARY KEY,
        organization_id UUID NOT NULL,
        meter_id UUID NOT NULL,
        customer_id UUID NOT NULL,
        customer_external_id VARCHAR,        -- the customer's, when held: events name either
        external_id VARCHAR NOT NULL,
        units DOUBLE NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL,
        status VARCHAR NOT NULL,             -- active, settled, released (expired: past expires_at)
        ended_at TIMESTAMPTZ                 -- settled or released at
    );
    """,
    # 17: webhooks (`store.webhook_tables`): endpoints, the events written in the transaction
    # that caused them, an outbox row per event and endpoint until delivered or given up, and
    # a row per delivery attempt.
    """
    CREATE TABLE webhook_endpoints (
        id UUID PRIMARY KEY,
        organization_id UUID NOT NULL,
        url VARCHAR NOT NULL,
        name VARCHAR,
        format VARCHAR NOT NULL,
        secret VARCHAR NOT NULL,
        events VARCHAR[] NOT NULL,
        enabled BOOLEAN NOT NULL,
        disabled_reason VARCHAR,             -- why meterline disabled it
        failing_since TIMESTAMPTZ,           -- its first failure since its last success
        created_at TIMESTAMPTZ NOT NULL,
        modified_at TIMESTAMPTZ,
        deleted_at TIMESTAMPTZ
    );
    CREATE TABLE webhook_events (
        id UUID PRIMARY KEY,                 -- the webhook-id of every delivery of it
        organization_id UUID NOT NULL,
        type VARCHAR NOT NULL,
        payload VARCHAR NOT NULL,            -- the body, exactly as signed and sent
        created_at TIMESTAMPTZ NOT NULL
    );
    CREATE TABLE webhook_outbox (
        event_id UUID NOT NULL,
        endpoint_id UUID NOT NULL,
        attempts INTEGER NOT NULL,
        next_at TIMESTAMPTZ NOT NULL,
        state VARCHAR NOT NULL,              -- pending, delivered, failed (given up, disabled)
        ended_at TIMESTAMPTZ
    );
    CREATE TABLE webhook_deliveries (
        id UUID PRIMARY KEY,
        organization_id UUID NOT NULL,
        event_id UUID NOT NULL,
        endpoint_id UUID NOT NULL,
        attempt INTEGER NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        succeeded BOOLEAN NOT NULL,
        http_code INTEGER,
        response VARCHAR,                    -- the response's first KiB, or the error
        latency_ms DOUBLE NOT NULL
    );
    -- Customers whose state changed since their last customer.state_changed event (marked in
    -- the change's transaction), and when each was last sent one (coalescing).
    CREATE TABLE webhook_state_changes (
        organization_id UUID NOT NULL,
        customer_id UUID NOT NULL,
        since TIMESTAMPTZ NOT NULL
    );
    CREATE TABLE webhook_state_sent (
        organization_id UUID NOT NULL,
        customer_id UUID NOT NULL,
        sent_at TIMESTAMPTZ NOT NULL
    );
    """,
    # 18: threshold alerts (`store.alert_tables`): a customer meter crossing a threshold sends
    # a `meter.alert` webhook event, written in the transaction of the change that crossed.
    """
    CREATE TABLE meter_alerts (
        id UUID PRIMARY KEY,
        organization_id UUID NOT NULL,
        meter_id UUID NOT NULL,
        customer_id UUID,                    -- NULL: every customer of the meter
        metric VARCHAR NOT NULL,             -- consumed_units, balance
        operator VARCHAR NOT NULL,           -- gte, lte
        threshold DOUBLE NOT NULL,
        external_id VARCHAR NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        deleted_at TIMESTAMPTZ
    );
    """,
    # 19: a backfill's progress in events, as the API shows it (the seq bounds above stay its
    # mechanics: a seq range holds other organizations' events too). Meters stored before
    # count theirs once here.
    """
    ALTER TABLE meters ADD COLUMN backfill_events BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE meters ADD COLUMN backfilled_events BIGINT NOT NULL DEFAULT 0;
    UPDATE meters SET
        backfill_events = (SELECT count(*) FROM events e WHERE e.organization_id
            = meters.organization_id AND e.source = 'user' AND e.seq <= meters.backfill_target),
        backfilled_events = (SELECT count(*) FROM events e WHERE e.organization_id
            = meters.organization_id AND e.source = 'user' AND e.seq <= meters.backfilled_to);
    """,
    # 20: whether the ingest log has a witness of how far it was acknowledged (its
    # `acknowledged` file, `store.ingest_log`): once it has, a log without one is missing, not
    # new. Logs from before get one at their next open.
    """
    ALTER TABLE ingest_stored ADD COLUMN witnessed BOOLEAN NOT NULL DEFAULT false;
    """,
    # 21: every API write is a record (`meters.commands`): what each answered, kept a day by
    # request id (`store.tables.command_outcomes`), and how far the control topic's records
    # are applied (Kafka mode), moved in the transaction of the writes they carry.
    """
    CREATE TABLE command_outcomes (
        organization_id UUID NOT NULL,
        request_id VARCHAR NOT NULL,
        kind VARCHAR NOT NULL,
        request VARCHAR NOT NULL,            -- sha256 of the record's kind and arguments
        outcome JSON NOT NULL,               -- the answer, or the rejection
        at_us BIGINT NOT NULL,               -- the record's time: kept a day after it
        PRIMARY KEY (organization_id, request_id)
    );
    CREATE TABLE control_offsets (
        topic VARCHAR NOT NULL,
        partition INTEGER NOT NULL,
        next_offset BIGINT NOT NULL,
        PRIMARY KEY (topic, partition)
    );
    """,
    # 22: the last seq applied when a hold was made: only events after it settle it, so that a
    # usage event applied before the hold (holds do not wait for applied events to be stored),
    # applied again after a crash (the ingest log, Kafka), does not settle it then either.
    # Holds made before: 0, as they were. (Other writes wait for applied events to be stored.)
    """
    ALTER TABLE meter_holds ADD COLUMN after_seq BIGINT NOT NULL DEFAULT 0;
    """,
    # 23: a customer's routing key (`intake.routing`: which shard holds its events), fixed when
    # it is made: its external id's subject if it had one, else its id's. Customers made
    # before: as of now (one shard then, so no event was placed by it). IF NOT EXISTS: the
    # step may run again on a database that has the column.
    """
    ALTER TABLE customers ADD COLUMN IF NOT EXISTS routing_key VARCHAR;
    UPDATE customers SET routing_key = CASE WHEN external_id IS NOT NULL
        THEN 'ext:' || external_id ELSE 'id:' || id::VARCHAR END;
    """,
    # 24: splits of a deployment of shards into more (`intake.splits`): the events topic's
    # offsets each was cut at, applied from the control topic; and the seq a data dir made
    # one of the new shards (`store.shard_retention`) draws after (the events it no longer
    # holds keep their seqs: forwarding cursors and holds compare seqs). Nothing stored
    # before changes. IF NOT EXISTS: as step 23.
    """
    CREATE TABLE IF NOT EXISTS shard_splits (
        from_count INTEGER NOT NULL,
        to_count INTEGER NOT NULL,
        partitions INTEGER NOT NULL,         -- the events topic's, when it was made
        -- {partition: the offset the old shards applied it to}: each old shard's, as its
        -- cores applied the split; the others' as their cut records come
        cuts JSON NOT NULL,
        at_us BIGINT NOT NULL,
        origin BOOLEAN NOT NULL DEFAULT false, -- this data dir is a new shard made by it
        PRIMARY KEY (from_count, to_count)
    );
    CREATE TABLE IF NOT EXISTS seq_floor (seq BIGINT NOT NULL);
    """,
    # 25: an organization's OTLP settings (`store.tables.otlp_settings`): the span attributes
    # that name its customers besides the deployment's, and the price table its GenAI spans
    # are costed by, as set through the API (the whole document replaced at each write).
    # Nothing stored before changes: an organization without a row has set none of its own.
    # IF NOT EXISTS: as step 23.
    """
    CREATE TABLE IF NOT EXISTS otlp_settings (
        organization_id UUID PRIMARY KEY,
        settings JSON NOT NULL,              -- {"customer_attributes": [...], "prices": ...}
        modified_at TIMESTAMPTZ NOT NULL
    );
    """,
    # 26: the points of the aggregations that depend on when events happened
    # (`meters.aggregations`: latest, integral): per meter, customer reference and 15-minute
    # bucket, (instant, value) pairs: a latest meter's greatest point of each batch's bucket,
    # every point of an integral meter (of several at one instant, readers and rewrites keep
    # the greatest value). The ledger keeps a latest meter's greatest point since each
    # customer's reset. Nothing stored before changes: no meter had these aggregations. IF NOT
    # EXISTS: as step 23.
    """
    CREATE TABLE IF NOT EXISTS rollup_points (
        meter_id UUID NOT NULL,
        subject VARCHAR NOT NULL,
        bucket TIMESTAMPTZ NOT NULL,
        at_us BIGINT NOT NULL,
        value DOUBLE NOT NULL
    );
    CREATE TABLE IF NOT EXISTS rollup_point_deltas AS SELECT * FROM rollup_points LIMIT 0;
    CREATE OR REPLACE VIEW all_rollup_points AS
        SELECT * FROM rollup_points UNION ALL SELECT * FROM rollup_point_deltas;
    CREATE TABLE IF NOT EXISTS ledger_points (
        meter_id UUID NOT NULL,
        subject VARCHAR NOT NULL,
        at_us BIGINT NOT NULL,
        value DOUBLE NOT NULL,
        PRIMARY KEY (meter_id, subject)
    );
    CREATE TABLE IF NOT EXISTS ledger_point_deltas AS SELECT * FROM ledger_points LIMIT 0;
    CREATE OR REPLACE VIEW all_ledger_points AS
        SELECT * FROM ledger_points UNION ALL SELECT * FROM ledger_point_deltas;
    """,
    # 27: credit grants (`store.tables.grant_tables`, `meters.ledger_rules`): each customer
    # meter's credits as grants with a priority and an optional expiry, burned in order; the
    # customer meter's running sums stay, kept equal to its grants'. A customer meter stored
    # before gets its credits as at most two grants of the default priority (100), never
    # expiring: its rollover credits (up to what it has credited) and the rest, so that credited,
    # balance and what a reset carries are what they were. IF NOT EXISTS: as step 23.
    """
    CREATE TABLE IF NOT EXISTS credit_grants (
        id UUID PRIMARY KEY,
        organization_id UUID NOT NULL,
        customer_id UUID NOT NULL,
        meter_id UUID NOT NULL,
        priority INTEGER NOT NULL,           -- lower burns first
        expires_at TIMESTAMPTZ,              -- NULL: never
        rollover BOOLEAN NOT NULL,
        seq BIGINT NOT NULL,                 -- the order granted (its first system event's seq)
        granted BIGINT NOT NULL,             -- units the credits merged into it granted
        units BIGINT NOT NULL,               -- granted less revoked
        expired_units BIGINT,                -- NULL while active; the unused units expiry took
        created_at TIMESTAMPTZ NOT NULL,
        modified_at TIMESTAMPTZ NOT NULL
    );
    INSERT INTO credit_grants SELECT * FROM (
        SELECT md5(customer_id::VARCHAR || '/' || meter_id::VARCHAR || '/migrated-' || kind)::UUID,
            organization_id, customer_id, meter_id, 100, NULL, kind = 'rollover', 0, units, units,
            NULL, created_at, coalesce(modified_at, created_at)
        FROM (
            SELECT *, 'rollover' AS kind, least(credited_rollover, credited) AS units
            FROM customer_meters
            UNION ALL
            SELECT *, 'plain', credited - least(credited_rollover, credited) FROM customer_meters
        )
    ) WHERE units > 0 AND NOT EXISTS (SELECT 1 FROM credit_grants);
    """,
    # 28: where each stored event without an external id that another shard moved here was
    # first read (`engine.dedupe`: its key, so that a row moved twice is applied once).
    # Rows moved before this step are not known: a row moved again after the upgrade (its
    # shard crashed between moving it and committing, across the upgrade) could count twice.
    """
    CREATE TABLE IF NOT EXISTS moved_events (
        seq BIGINT NOT NULL,
        origin_partition INTEGER NOT NULL,
        origin_offset BIGINT NOT NULL,
        origin_row INTEGER NOT NULL
    );
    """,
    # 29: segments (`engine.segments`): the events and the rollups are stored as Parquet
    # files from now on, read through views over each relation's base table and its files. The
    # events table becomes the events' base (what was stored before, and system events, which
    # jobs write one at a time); the rollups' deltas are folded into their tables, which become
    # the rollups' bases, and dropped (the merger replaces them and the rewrites sorted).
    """
    ALTER TABLE events RENAME TO events_base;
    CREATE TABLE segments (
        relation VARCHAR NOT NULL,
        number BIGINT PRIMARY KEY,          -- its file's name: <relation>-<number>.parquet
        level INTEGER NOT NULL,             -- merged this many times
        rows BIGINT NOT NULL,
        size BIGINT NOT NULL                -- bytes, as written (a file of another size is damaged)
    );
    DROP VIEW all_rollups;
    DROP VIEW all_rollup_values;
    DROP VIEW all_rollup_points;
    CREATE TABLE rollups_folded AS
        SELECT meter_id, subject, bucket, sum(events)::BIGINT AS events, sum(total) AS total,
            min(low) AS low, max(high) AS high
        FROM (SELECT * FROM rollups UNION ALL SELECT * FROM rollup_deltas)
        GROUP BY ALL ORDER BY meter_id, subject, bucket;
    CREATE TABLE rollup_values_folded AS
        SELECT DISTINCT * FROM
            (SELECT * FROM rollup_values UNION ALL SELECT * FROM rollup_value_deltas)
        ORDER BY meter_id, subject, bucket;
    CREATE TABLE rollup_points_folded AS
        SELECT meter_id, subject, bucket, at_us, max(value) AS value
        FROM (SELECT * FROM rollup_points UNION ALL SELECT * FROM rollup_point_deltas)
        GROUP BY ALL ORDER BY meter_id, subject, bucket, at_us;
    DROP TABLE rollups;
    DROP TABLE rollup_deltas;
    DROP TABLE rollup_values;
    DROP TABLE rollup_value_deltas;
    DROP TABLE rollup_points;
    DROP TABLE rollup_point_deltas;
    ALTER TABLE rollups_folded RENAME TO rollups;
    ALTER TABLE rollup_values_folded RENAME TO rollup_values;
    ALTER TABLE rollup_points_folded RENAME TO rollup_points;
    CREATE VIEW events AS SELECT * FROM events_base;
    CREATE VIEW all_rollups AS SELECT * FROM rollups;
    CREATE VIEW all_rollup_values AS SELECT * FROM rollup_values;
    CREATE VIEW all_rollup_points AS SELECT * FROM rollup_points;
    """,
    # 30: corrections (`store.tables.corrections`, decision 18): the voided events, by seq, with
    # the request that voided them and why; the `events` view leaves them out from then on and
    # `all_events` (the relation's view: `segments`) keeps every stored event. An amended
    # event's later versions, with the version each one is and the event it replaced.
    """
    CREATE TABLE voided_events (
        seq BIGINT PRIMARY KEY,
        organization_id UUID NOT NULL,
        request_id VARCHAR NOT NULL,
        reason VARCHAR NOT NULL,
        voided_at TIMESTAMPTZ NOT NULL
    );
    CREATE TABLE event_versions (
        id UUID PRIMARY KEY,                 -- the new version's event id
        organization_id UUID NOT NULL,
        replaces UUID NOT NULL,              -- the version it voided
        version INTEGER NOT NULL             -- 2 and up (an event stored before is version 1)
    );
    DROP VIEW events;
    CREATE VIEW all_events AS SELECT * FROM events_base;
    CREATE VIEW events AS SELECT * FROM all_events ANTI JOIN voided_events USING (seq);
    """,
    # 31: voids by filter as jobs (`store.tables.void_jobs`): what each asked, the events it
    # reaches (those stored when it was asked), how far its steps have gone. The voided events
    # become a relation kept as segments (`engine.segments`): a job's step writes its
    # markers as a file before the writer takes it, which then only lists it (inserting
    # 200,000 rows held the writer 45 ms). Its base table keeps the rows voids of a few events
    # insert; it has no primary key (read whole by the `events` view's anti join, or by a
    # page's seqs; a void never marks an event twice: it selects current ones).
    """
    ALTER TABLE voided_events RENAME TO voided_events_keyed;
    CREATE TABLE voided_events_base (
        seq BIGINT NOT NULL,
        organization_id UUID NOT NULL,
        request_id VARCHAR NOT NULL,
        reason VARCHAR NOT NULL,
        voided_at TIMESTAMPTZ NOT NULL
    );
    INSERT INTO voided_events_base SELECT * FROM voided_events_keyed ORDER BY seq;
    DROP TABLE voided_events_keyed;
    CREATE VIEW voided_events AS SELECT * FROM voided_events_base;
    CREATE TABLE void_jobs (
        id UUID PRIMARY KEY,
        organization_id UUID NOT NULL,
        subject VARCHAR NOT NULL,            -- the customer reference the filter named
        request_id VARCHAR NOT NULL,         -- what the voided events' markers name
        reason VARCHAR NOT NULL,
        actor VARCHAR,
        filter JSON NOT NULL,                -- as asked
        selection JSON NOT NULL,             -- as resolved: customer ids, external ids, range
        through_seq BIGINT NOT NULL,         -- the last seq applied when it was asked
        matched BIGINT NOT NULL,             -- current events it matched then
        voided BIGINT NOT NULL DEFAULT 0,
        done_to BIGINT NOT NULL DEFAULT 0,   -- seqs up to here are done
        status VARCHAR NOT NULL,             -- running, done
        created_at TIMESTAMPTZ NOT NULL,
        finished_at TIMESTAMPTZ
    );
    """,
    # 32: a meter's dimensions (`meters.definitions`): the metadata properties whose values
    # split its usage, in the order they were given; none for every meter stored before.
    """
    ALTER TABLE meters ADD COLUMN dimensions VARCHAR[] NOT NULL DEFAULT [];
    """,
    # 33: rollups per group of a meter's dimensions' values (`metering.rollups`, decision 19):
    # per (meter, customer reference, bucket) and the values of the meter's dimensions in its
    # order (d0..d2, null where the event has none or the meter fewer). Kept as segments, as
    # the rollups are. The meters given dimensions before are listed in `rollup_groups_pending`:
    # the store derives their rows from the stored events when it opens
    # (`dimensions.derive_pending`), which a SQL step cannot (it evaluates the meters).
    """
    CREATE TABLE rollup_groups (
        meter_id UUID NOT NULL,
        subject VARCHAR NOT NULL,
        bucket TIMESTAMPTZ NOT NULL,
        d0 VARCHAR,
        d1 VARCHAR,
        d2 VARCHAR,
        events BIGINT NOT NULL,
        total DOUBLE NOT NULL,
        low DOUBLE NOT NULL,
        high DOUBLE NOT NULL
    );
    CREATE VIEW all_rollup_groups AS SELECT * FROM rollup_groups;
    CREATE TABLE rollup_groups_pending AS
        SELECT id AS meter_id FROM meters WHERE len(dimensions) > 0;
    """,
    # 34: rollup-mode forwarding per group of a meter's dimensions (`forward_rollups`): what
    # was forwarded of each group ('' for a meter's whole, as every row stored before).
    """
    CREATE TABLE forward_rollups_grouped (
        organization_id UUID NOT NULL,
        meter_id UUID NOT NULL,
        subject VARCHAR NOT NULL,
        period TIMESTAMPTZ NOT NULL,
        grp VARCHAR NOT NULL,                -- the dimensions' values, a JSON array; '' none
        units DOUBLE NOT NULL,
        events BIGINT NOT NULL,
        revision INTEGER NOT NULL,
        PRIMARY KEY (organization_id, meter_id, subject, period, grp)
    );
    INSERT INTO forward_rollups_grouped
        SELECT organization_id, meter_id, subject, period, '', units, events, revision
        FROM forward_rollups;
    DROP TABLE forward_rollups;
    ALTER TABLE forward_rollups_grouped RENAME TO forward_rollups;
    """,
    # 35: the meters whose groups ever held `OTHER` (`groups.list_folded`): only theirs map an
    # event's value read from the events through its bucket's groups (`dimensions.value_sql`).
    # A data dir of before lists every meter with dimensions: any may have.
    """
    CREATE TABLE folded_meters (meter_id UUID PRIMARY KEY);
    INSERT INTO folded_meters SELECT id FROM meters WHERE len(dimensions) > 0;
    """,
    # 36: an organization's pricing settings (`store.tables.pricing_settings`): whether its
    # `_llm` events without `_cost` are priced from the catalogue, the markup and its own
    # per-model prices (the whole document replaced at each write). Nothing stored before
    # changes: an organization without a row prices nothing.
    """
    CREATE TABLE pricing_settings (
        organization_id UUID PRIMARY KEY,
        settings JSON NOT NULL,              -- {"catalog", "markup_percent", "overrides"}
        modified_at TIMESTAMPTZ NOT NULL
    );
    """,
    # 37: top-up rules (`store.tables.topup_tables`, `meters.topup_rules`): a customer meter's
    # available balance falling below a rule's threshold credits its units as a grant, at most
    # `max_per_period` times per period; each top-up is a row named by what it is (rule,
    # customer, meter, period, n-th), written with its grant in the transaction of the event
    # that caused it, and where in the customer meter's window that event was (`window_seq`, the
    # reset's seq, and `place`, the events counted by then: a replay after a crash finds it).
    """
    CREATE TABLE top_up_rules (
        id UUID PRIMARY KEY,
        organization_id UUID NOT NULL,
        meter_id UUID NOT NULL,
        customer_id UUID,                    -- NULL: every customer of the meter
        threshold DOUBLE NOT NULL,
        units BIGINT NOT NULL,
        max_per_period INTEGER NOT NULL,
        period VARCHAR NOT NULL,             -- day, week, month (UTC)
        priority INTEGER NOT NULL,
        expires_in_days INTEGER,             -- NULL: the grants never expire
        refused_reason VARCHAR,              -- why the last top-up due was refused, if one was
        refused_at TIMESTAMPTZ,
        created_at TIMESTAMPTZ NOT NULL,
        modified_at TIMESTAMPTZ NOT NULL,
        deleted_at TIMESTAMPTZ
    );
    CREATE TABLE top_ups (
        id UUID PRIMARY KEY,
        organization_id UUID NOT NULL,
        rule_id UUID NOT NULL,
        customer_id UUID NOT NULL,
        meter_id UUID NOT NULL,
        period VARCHAR NOT NULL,             -- the period's key: 2026-11-28, 2026-W48, 2026-11
        number INTEGER NOT NULL,             -- n-th of the rule's for the customer meter in it
        units BIGINT NOT NULL,
        grant_id UUID NOT NULL,
        window_seq BIGINT NOT NULL,          -- the customer meter's reset seq (0: none)
        place BIGINT NOT NULL,               -- events the window counted by the cause
        event_seq BIGINT NOT NULL,           -- the event that caused it
        balance_before DOUBLE NOT NULL,      -- available, after that event
        created_at TIMESTAMPTZ NOT NULL
    );
    """,
    # 38: the ledger's truth is the balances in memory (decision 17), written as files by
    # checkpoints, each flush and each job adding usage (`engine.ledger_log`): the deltas are
    # folded into the keyed tables a last time, and those become the base tables of the
    # ledger's relations (their rows move into a file once, at open: `move_base_rows`); the
    # changes other than usage added are listed in `ledger_changes`, each after the files
    # numbered up to its `after`.
    """
    INSERT INTO ledger_usage SELECT meter_id, subject, sum(events), sum(total), min(low),
        max(high), min(created_at), max(modified_at) FROM ledger_usage_deltas GROUP BY ALL
        ON CONFLICT DO UPDATE SET events = events + excluded.events,
        total = total + excluded.total, low = least(low, excluded.low),
        high = greatest(high, excluded.high),
        created_at = least(created_at, excluded.created_at),
        modified_at = greatest(modified_at, excluded.modified_at);
    INSERT INTO ledger_usage_values SELECT DISTINCT * FROM ledger_usage_value_deltas
        ON CONFLICT DO NOTHING;
    INSERT INTO ledger_points SELECT meter_id, subject, p.at_us, p.value FROM (SELECT meter_id,
        subject, max({'at_us': at_us, 'value': value}) AS p FROM ledger_point_deltas
        GROUP BY ALL) ON CONFLICT DO UPDATE SET at_us = excluded.at_us, value = excluded.value
        WHERE (excluded.at_us, excluded.value) > (ledger_points.at_us, ledger_points.value);
    DROP VIEW all_ledger_usage;
    DROP VIEW all_ledger_usage_values;
    DROP VIEW all_ledger_points;
    DROP TABLE ledger_usage_deltas;
    DROP TABLE ledger_usage_value_deltas;
    DROP TABLE ledger_point_deltas;
    CREATE TABLE ledger_changes (
        id BIGINT PRIMARY KEY,                -- their order
        after BIGINT NOT NULL,                -- the ledger's files numbered up to it come first
        kind VARCHAR NOT NULL,                -- cleared, values_dropped, meter_dropped, forgotten
        organization_id VARCHAR,              -- forgotten
        meter_id VARCHAR,                     -- the others
        subjects VARCHAR[] NOT NULL,
        dropped VARCHAR[] NOT NULL            -- values_dropped: the values
    );
    """,
)


def migrate(con: duckdb.DuckDBPyConnection, until: int | None = None) -> int:
    """Apply the steps this database has not seen (up to step `until`, for tests of data left
    by earlier versions); return the resulting version."""
    con.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations"
        " (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
    )
    current = int(
        con.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchall()[0][0]
    )
    steps = MIGRATIONS[:until] if until is not None else MIGRATIONS
    pending = list(enumerate(steps[current:], start=current + 1))
    # A new database takes every step in one transaction: a crash leaves no schema half made,
    # and it takes half the CPU of a commit per step.
    # A database with data takes a step per transaction: a step that fails leaves the ones
    # before it applied.
    for group in [pending] if current == 0 else [[one] for one in pending]:
        with transaction(con):
            for version, step in group:
                con.execute(step)
                con.execute("INSERT INTO schema_migrations (version) VALUES (?)", [version])
    return len(steps)
