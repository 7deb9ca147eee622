"""The `meterline` command: composes processes from settings given on the command line.

meterline up [--host 127.0.0.1] [--port 8000] [--data-dir ./.meterline] [--kafka BOOTSTRAP]
meterline cluster [--dir ./.meterline-cluster] [--port 8010] [--kafka-port 9192]
meterline core --kafka BOOTSTRAP [--port 8000] [--data-dir ./.meterline]
meterline ingest --kafka BOOTSTRAP [--port 8001] [--data-dir ./.meterline]
meterline token create|list|revoke [--data-dir DIR] ...
meterline org list|show NAME [--data-dir DIR]
meterline ingest-log check|repair [--data-dir DIR]
meterline schema record
meterline meters wait [METER_ID ...]
meterline reconcile --from T1 --to T2 --upstream-url URL [--repair] [--mode raw|rollup]
meterline forwarder status|quarantine|resend SEQ
meterline status [--url URL]

Exit status: 0 done, 1 the work found a problem (drift, a failed meter), 2 could not run: one
line on stderr saying what was tried and what to do. What a command logs is held until it serves
or ends (`commands.common.HeldLogs`): a command that could not run says only that line, one that
runs shows its log; an error nobody foresaw (a bug) ends in its traceback, after the log.

The parser is built from the commands' options alone (`commands.options`, `serving.options`,
`upstream.options`: they import no more than the settings do), and a command's module is
imported when it runs: `meterline --help`, a mistyped option or `meterline token create` load
neither DuckDB, nor Arrow, nor the HTTP server, nor Kafka's client.
"""

from __future__ import annotations

import argparse
import sys

from aggregator.commands import options
from aggregator.commands.common import HeldLogs, HelpFormatter, Version
from aggregator.errors import UsageError
from aggregator.serving import options as serving_options
from aggregator.upstream import options as upstream_options
from ingest.errors import KafkaUnreachable


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meterline",
        description=__doc__.split("\n")[0],
        epilog="Exit status: 0 done, 1 the work found a problem, 2 could not run.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action=Version)
    commands = parser.add_subparsers(dest="command", required=True)
    serving_options.commands(commands)  # up, core, ingest
    options.cluster(commands)
    options.token(commands)
    options.meters(commands)
    options.org(commands)
    options.schema(commands)
    upstream_options.commands(commands)  # reconcile, forwarder
    options.dead_letters(commands)
    options.ingest_log(commands)
    options.backups(commands)  # backup, restore
    options.export(commands)
    options.status(commands)
    options.split(commands)  # last: test_startup's probe checks that the last --help ran
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as `main` reads it (argparse exits 2 on a bad one)."""
    return _parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    with HeldLogs.installed() as logs:
        try:
            return _run(args, logs)
        except (UsageError, KafkaUnreachable) as exc:
            logs.drop()
            print(f"meterline: {_said(exc)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # before a server handles signals, or a command's own
            logs.show()  # what it was doing, stopped
            print("meterline: interrupted", file=sys.stderr)
            return 130


def _said(exc: UsageError | KafkaUnreachable) -> str:
    """What could not work, and what to do about it."""
    if not isinstance(exc, KafkaUnreachable):
        return str(exc)
    if exc.refused is not None:
        return (
            f"{exc}: start the broker, or fix --kafka (--kafka-start-timeout-seconds waits longer)"
        )
    return (
        f"{exc}: check that --kafka names a Kafka broker's listener, and that"
        " --kafka-security-protocol and its options are that listener's"
    )


def _run(args: argparse.Namespace, logs: HeldLogs) -> int:
    """Run the parsed command, importing its module only now (see the module's docstring)."""
    name = args.command
    if name in ("up", "core", "ingest"):
        from aggregator.serving import command

        return command.run(args, serving=logs.show)
    if name == "token":
        from aggregator.commands import tokens

        return tokens.run(args)
    if name == "meters":
        from aggregator.commands import meters

        return meters.run(args)
    if name == "org":
        from aggregator.commands import orgs

        return orgs.run(args)
    if name == "schema":
        from aggregator.commands import schema

        return schema.run(args)
    if name in ("reconcile", "forwarder"):
        from aggregator.upstream import command_line

        return command_line.run(args)
    if name == "dead-letters":
        from aggregator.commands import dead_letters

        return dead_letters.run(args)
    if name == "ingest-log":
        from aggregator.commands import ingest_log

        return ingest_log.run(args)
    if name in ("backup", "restore"):
        from aggregator.commands import backups

        return backups.run(args)
    if name == "export":
        from aggregator.commands import export

        return export.run(args)
    if name == "cluster":
        from aggregator.commands import cluster

        return cluster.run(args)
    if name == "status":
        from aggregator.commands import status

        return status.run(args)
    assert name == "split", name
    from aggregator.commands import shards

    return shards.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
