"""The store: one DuckDB file, owned by one process (`Store`, in `store.py`). Its rooms, bottom
to top: `base` (what everything shares), `metering` (what meters compute), `engine` (how writes
reach the file), `tables` (one module per kind of table), `apply` (applying a batch of events).
This module is its public face: the rest of the core imports these names only
(`aggregator/ruff.toml`, `tests/test_layout.py`).
"""

from __future__ import annotations

from aggregator.store.apply.consumed import (
    ConsumedBatch,
    OffsetReset,
    Reset,
    StartOffsets,
    offset_resets,
    stored_offsets,
)
from aggregator.store.apply.ingest import IngestJob, missing_customers
from aggregator.store.base import subjects
from aggregator.store.base.ids import ORIGIN
from aggregator.store.base.meter_rows import MeterRow, get_meter
from aggregator.store.engine import ingest_log_repair
from aggregator.store.engine.balances import Balances
from aggregator.store.engine.checkpoints import copy_newest as copy_checkpoint
from aggregator.store.engine.checkpoints import folder as checkpoints_folder
from aggregator.store.engine.disk import full as disk_full
from aggregator.store.engine.ingest_log import LogCorrupt, with_origin, with_source
from aggregator.store.engine.live import Changed, Live
from aggregator.store.engine.memtable import Positions
from aggregator.store.engine.segments import SUFFIX as SEGMENT_SUFFIX
from aggregator.store.engine.segments import copy_files as copy_segments
from aggregator.store.engine.segments import folder_of as segments_folder
from aggregator.store.engine.writer import Job, Outcome
from aggregator.store.metering.meter_sql import filter_sql, meter_events_sql
from aggregator.store.metering.rollups import Prepared
from aggregator.store.store import Store
from aggregator.store.tables import (
    alert_tables,
    correction_reads,
    cost_queries,
    customer_tables,
    dimensions,
    event_tables,
    event_type_tables,
    export_reads,
    export_usage,
    forward_rollups,
    grant_tables,
    hold_tables,
    ledger_reads,
    ledger_tables,
    meter_tables,
    otlp_settings,
    outbox,
    plan_tables,
    pricing_settings,
    quantities,
    quotas,
    shard_splits,
    topup_tables,
    void_jobs,
    void_plans,
    void_steps,
    webhook_endpoints,
    webhook_tables,
)
from aggregator.store.tables.alert_tables import AlertRow, Firing
from aggregator.store.tables.command_outcomes import advance_control_job, control_offset
from aggregator.store.tables.correction_jobs import Voided
from aggregator.store.tables.correction_reads import Replaced
from aggregator.store.tables.cost_queries import GROUP_KEYS, CostQuery, decimal_text
from aggregator.store.tables.customer_tables import CUSTOMER_SORTS, CustomerRow, customers_by_refs
from aggregator.store.tables.digest import derived_figures, logical_rows
from aggregator.store.tables.event_tables import EventQuery, subjects_first_timestamp
from aggregator.store.tables.event_type_tables import (
    EventTypeRow,
    NameStats,
    name_stats,
    stored_types,
    type_id,
)
from aggregator.store.tables.grant_tables import GrantRow
from aggregator.store.tables.hold_tables import HoldRow, held_by_pair
from aggregator.store.tables.ledger_reads import CustomerMeter, held_customer_meter
from aggregator.store.tables.meter_tables import (
    METER_SORTS,
    backfill_step_job,
    failed_meters,
    meters_by_ids,
    pending_backfills,
)
from aggregator.store.tables.outbox import Pending
from aggregator.store.tables.plan_tables import PlanRow, cycle_due_job
from aggregator.store.tables.quantities import Gathered, Scope
from aggregator.store.tables.quotas import TenantLimits
from aggregator.store.tables.record_checks import row_problems
from aggregator.store.tables.topup_tables import RuleRow as TopUpRuleRow
from aggregator.store.tables.topup_tables import TopUpRow
from aggregator.store.tables.void_jobs import VoidJob
from aggregator.store.tables.webhook_endpoints import EndpointRow
from aggregator.store.tables.webhook_tables import (
    Attempt,
    DeliveryRow,
    Due,
    StatePayload,
    attempt_record,
    failures,
    next_due_us,
    prune_job,
    state_changes_due,
)

# The store's public face: what the rest of the core uses (the services' reads and jobs,
# the row types they return, the intake's jobs), each table module as a namespace of the
# names in its `__all__`. Nothing outside the store imports its rooms (`aggregator/ruff.toml`).
__all__ = [
    "CUSTOMER_SORTS",
    "GROUP_KEYS",
    "METER_SORTS",
    "ORIGIN",
    "SEGMENT_SUFFIX",
    "AlertRow",
    "Attempt",
    "Balances",
    "Changed",
    "ConsumedBatch",
    "CostQuery",
    "CustomerMeter",
    "CustomerRow",
    "DeliveryRow",
    "Due",
    "EndpointRow",
    "EventQuery",
    "EventTypeRow",
    "Firing",
    "Gathered",
    "GrantRow",
    "HoldRow",
    "IngestJob",
    "Job",
    "Live",
    "LogCorrupt",
    "MeterRow",
    "NameStats",
    "OffsetReset",
    "Outcome",
    "Pending",
    "PlanRow",
    "Positions",
    "Prepared",
    "Replaced",
    "Reset",
    "Scope",
    "StartOffsets",
    "StatePayload",
    "Store",
    "TenantLimits",
    "TopUpRow",
    "TopUpRuleRow",
    "VoidJob",
    "Voided",
    "advance_control_job",
    "alert_tables",
    "attempt_record",
    "backfill_step_job",
    "checkpoints_folder",
    "control_offset",
    "copy_checkpoint",
    "copy_segments",
    "correction_reads",
    "cost_queries",
    "customer_tables",
    "customers_by_refs",
    "cycle_due_job",
    "decimal_text",
    "derived_figures",
    "dimensions",
    "disk_full",
    "event_tables",
    "event_type_tables",
    "export_reads",
    "export_usage",
    "failed_meters",
    "failures",
    "filter_sql",
    "forward_rollups",
    "get_meter",
    "grant_tables",
    "held_by_pair",
    "held_customer_meter",
    "hold_tables",
    "ingest_log_repair",
    "ledger_reads",
    "ledger_tables",
    "logical_rows",
    "meter_events_sql",
    "meter_tables",
    "meters_by_ids",
    "missing_customers",
    "name_stats",
    "next_due_us",
    "offset_resets",
    "otlp_settings",
    "outbox",
    "pending_backfills",
    "plan_tables",
    "pricing_settings",
    "prune_job",
    "quantities",
    "quotas",
    "row_problems",
    "segments_folder",
    "shard_splits",
    "state_changes_due",
    "stored_offsets",
    "stored_types",
    "subjects",
    "subjects_first_timestamp",
    "topup_tables",
    "type_id",
    "void_jobs",
    "void_plans",
    "void_steps",
    "webhook_endpoints",
    "webhook_tables",
    "with_origin",
    "with_source",
]
