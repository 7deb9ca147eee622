"""The options of the commands that are not a process (their `run` is in the module of each:
`tokens`, `meters`, `orgs`, `schema`, `dead_letters`, `ingest_log`, `backups`, `shards`,
`status`), and of `cluster`, which runs processes (`cluster`).

Every `meterline` command builds all of them, `--help` included, so this module imports no
more than the settings do: a command's module is imported when it runs (`aggregator.cli`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from aggregator.commands.common import (
    MOMENT_HELP,
    command,
    data_dir_option,
    moment,
    secret_file_option,
    server_options,
    topic_options,
)
from aggregator.settings import DEAD_LETTER_SCAN
from ingest.settings import KafkaSettings
from meters.settings import EventRules


def token(subparsers: Any) -> None:
    token = command(subparsers, "token", "manage organization access tokens")
    actions = token.add_subparsers(dest="token_command", required=True)
    create = command(actions, "create", "print a new token, alone on stdout")
    data_dir_option(create)
    secret_file_option(create)
    create.add_argument("--org", required=True, help="organization name (created if needed)")
    create.add_argument(
        "--label",
        default="created with meterline token create",
        help="what the token is for (shown by `token list`)",
    )
    create.add_argument(
        "--kafka",
        metavar="BOOTSTRAP",
        help="publish the token on the cluster's control topic instead (edges and cores read it"
        " there); --data-dir then only gives the cluster secret, secret.key (or --secret-file"
        " does)",
    )
    topic_options(create)
    create.add_argument(
        "--init",
        action="store_true",
        help="start a new data dir if --data-dir holds no meterline data yet (a server"
        " started on it later accepts the token)",
    )
    listing = command(actions, "list", "list tokens (never their text)")
    data_dir_option(listing)
    revoke = command(actions, "revoke", "revoke a token by id")
    data_dir_option(revoke)
    revoke.add_argument("token_id", help="the token's id (first column of `token list`)")


def meters(subparsers: Any) -> None:
    meters = command(subparsers, "meters", "a running server's meters")
    actions = meters.add_subparsers(dest="meters_command", required=True)
    wait = command(
        actions,
        "wait",
        "wait until meters' backfills are done, showing their progress in events",
    )
    wait.add_argument(
        "meter_ids",
        nargs="*",
        metavar="METER_ID",
        help="the meters to wait for (default: every meter of the organization not archived)",
    )
    server_options(wait, "a token of the meters' organization")
    wait.add_argument(
        "--timeout", type=float, default=0.0, help="seconds to wait at most (0: until done)"
    )
    wait.add_argument("--poll-seconds", type=float, default=1.0, help="how often to ask")


def org(subparsers: Any) -> None:
    org = command(subparsers, "org", "list organizations and their ids")
    actions = org.add_subparsers(dest="org_command", required=True)
    data_dir_option(command(actions, "list", "one line per organization: id, name, tokens"))
    show = command(actions, "show", "one organization: id, name, created, tokens")
    data_dir_option(show)
    show.add_argument("name", help="the organization's name (as `token create --org` took it)")


def schema(subparsers: Any) -> None:
    schema = command(subparsers, "schema", "print the schema of what producers write")
    kinds = schema.add_subparsers(dest="schema_command", required=True)
    record = command(kinds, "record", "the JSON Schema of a JSON record's value")
    record.add_argument(
        "--max-future-seconds",
        type=float,
        default=EventRules().max_future.total_seconds(),
        help="the core's --max-future-seconds, named in the schema's runtime rules",
    )


def dead_letters(subparsers: Any) -> None:
    group = command(subparsers, "dead-letters", "read and replay the dead-letter topic (Kafka)")
    actions = group.add_subparsers(dest="dead_letters_command", required=True)
    listing = command(actions, "list", "the newest dead letters, newest first")
    _kafka_options(listing)
    _filters(listing)
    show = command(actions, "show", "one dead letter: its headers, then its value on stdout")
    _kafka_options(show)
    show.add_argument("where", metavar="PARTITION:OFFSET", help="as `list` prints it")
    again = command(
        actions,
        "replay",
        "publish dead letters' records to the events topic again (safe twice: deduplicated"
        " by external_id)",
    )
    _kafka_options(again)
    again.add_argument(
        "where",
        nargs="*",
        metavar="PARTITION:OFFSET",
        help="the dead letters to replay (default: those the filters match)",
    )
    _filters(again)
    again.add_argument(
        "--value-file",
        type=Path,
        help="publish this file's bytes instead of the record's value (one dead letter only)",
    )
    again.add_argument(
        "--allow-duplicates",
        action="store_true",
        help="replay JSON records without external_id too (applied again if they were before)",
    )


def _kafka_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kafka",
        metavar="BOOTSTRAP",
        default=os.environ.get("METERLINE_KAFKA"),
        help="bootstrap servers (default: $METERLINE_KAFKA)",
    )
    topic_options(parser)


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--organization", help="only this organization's (its id)")
    parser.add_argument("--reason", help="only those whose reason contains this text")
    parser.add_argument("--limit", type=int, default=50, help="at most this many")
    parser.add_argument(
        "--scan",
        type=int,
        default=DEAD_LETTER_SCAN,
        help="read at most this many of the newest records",
    )


def ingest_log(subparsers: Any) -> None:
    log = command(
        subparsers, "ingest-log", "check the ingest log, or move what does not read back aside"
    )
    actions = log.add_subparsers(dest="ingest_log_command", required=True)
    data_dir_option(
        command(actions, "check", "whether the log reads back whole; if not, what is lost")
    )
    data_dir_option(
        command(
            actions,
            "repair",
            "keep every request that reads back whole, move the rest aside (kept, not"
            " deleted) so the server starts; says what is lost",
        )
    )


def export(subparsers: Any) -> None:
    once = command(
        subparsers,
        "export",
        "the current events of a range, once, as a Delta Lake table (from a stopped data dir"
        " or a restored snapshot; a core exports continuously with --export-to)",
    )
    once.add_argument(
        "--to",
        required=True,
        metavar="DIR|s3://bucket/prefix",
        help="where the table is (<target>/events); the range's rows replace its rows there",
    )
    once.add_argument(
        "--from",
        dest="start",
        required=True,
        type=moment,
        metavar="T1",
        help=f"the range's start, included: {MOMENT_HELP}",
    )
    once.add_argument(
        "--until",
        dest="end",
        required=True,
        type=moment,
        metavar="T2",
        help="the range's end, excluded, as T1",
    )
    data_dir_option(once)


def backups(subparsers: Any) -> None:
    backup = command(
        subparsers,
        "backup",
        "a snapshot of the data dir of a running core (`up` or `core`), taken while it serves,"
        " into a folder or S3",
    )
    backup.add_argument(
        "--to",
        required=True,
        metavar="DIR|s3://BUCKET/PREFIX",
        help="where the snapshot's folder goes (it holds the data dir's secret.key, if any: keep"
        " it as private as the data dir); S3 needs the s3 extra",
    )
    data_dir_option(backup)
    restoring = command(
        subparsers, "restore", "make a data dir from a snapshot (`backup`, or --backup-to)"
    )
    restoring.add_argument(
        "--from",
        dest="snapshot",
        required=True,
        metavar="DIR|s3://BUCKET/PREFIX",
        help="a snapshot, or a folder or prefix of snapshots (the newest); with --shard, also"
        " the data dir of a retired shard's core",
    )
    restoring.add_argument(
        "--shard",
        metavar="J/M",
        help="make shard J of the M that `meterline split` split this data dir's shard into:"
        " --from is that shard's data dir (its core retired: exit 0) or a snapshot taken after,"
        " and what shard J/M does not hold is left out",
    )
    restoring.add_argument("--topic", default=KafkaSettings("").topic, help="the events topic")
    data_dir_option(restoring)


def split(subparsers: Any) -> None:
    split = command(
        subparsers,
        "split",
        "split a deployment of N shards into M, a multiple of N: every core of the N shards"
        " stops where it has applied its partitions (exit 0), and each new shard J/M is made"
        " from the data dir of shard J mod N (`restore --shard J/M`)",
    )
    split.add_argument("--kafka", required=True, metavar="BOOTSTRAP", help="the cluster's broker")
    split.add_argument(
        "--from",
        dest="from_count",
        type=int,
        required=True,
        metavar="N",
        help="the shard count the cores run with now (their --shard I/N)",
    )
    split.add_argument(
        "--to",
        dest="to_count",
        type=int,
        required=True,
        metavar="M",
        help="the shard count after the split: a multiple of N, at most the topic's partitions",
    )
    split.add_argument(
        "--wait-seconds",
        type=float,
        default=60.0,
        help="how long to wait for every old shard to say where it stopped",
    )
    topic_options(split)
    data_dir_option(split)  # its secret.key: the cluster secret


# `meterline cluster`'s: beside `make up` (8000) and `make docs` (8001), and off Kafka's 9092.
CLUSTER_DIR = Path(".meterline-cluster")
CLUSTER_PORT = 8010
CLUSTER_KAFKA_PORT = 9192


def cluster(subparsers: Any) -> None:
    cluster = command(
        subparsers,
        "cluster",
        "Kafka mode on this machine, until Ctrl-C: a Tansu broker, a leader core, a standby"
        " core, a replica core and an edge in front of them, with one cluster secret (`make"
        " cluster`)",
    )
    cluster.add_argument(
        "--dir",
        type=Path,
        default=CLUSTER_DIR,
        help="the folder of the processes' data dirs, their logs and the cluster secret;"
        " emptied at each start, as the broker keeps its log in memory",
    )
    cluster.add_argument(
        "--port",
        type=int,
        default=CLUSTER_PORT,
        help="the edge's port; the three cores listen on the next three",
    )
    cluster.add_argument(
        "--kafka-port", type=int, default=CLUSTER_KAFKA_PORT, help="the broker's port"
    )
    cluster.add_argument(
        "--start-timeout-seconds",
        type=float,
        default=120.0,
        help="how long every process has to answer before the start is given up",
    )


def status(subparsers: Any) -> None:
    status = command(
        subparsers,
        "status",
        "what runs, in one screen: each core's role, whether it is alive, its last heartbeat"
        " and epoch, how far behind it is, its health, its last snapshot, its data dir and the"
        " disk under it; then what is wrong (exit 1), or all well (exit 0)",
    )
    server_options(status, "a token of any organization (GET /v1/cluster/ takes any)")
    status.add_argument(
        "--metrics-token",
        default=os.environ.get("METERLINE_METRICS_TOKEN"),
        help="the cores' --metrics-token, if they have one (default: $METERLINE_METRICS_TOKEN)",
    )
    status.add_argument(
        "--max-lag",
        type=int,
        default=1000,
        help="a core further behind is a problem: journal entries it has not applied (Kafka"
        " mode), and for a leader also its events partitions' records it has not read",
    )
    status.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for each answer"
    )
