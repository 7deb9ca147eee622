"""What the `meterline` command's subcommands share (help, options from the environment,
progress, a client of a running server), the options of those that are not a process
(`options`), and each one's `run`; the processes are `aggregator.serving`'s, the upstream's
commands `aggregator.upstream.command_line`."""
