"""What the `meterline` command's subcommands share (help, options from the environment,
progress, a client of a running server) and the subcommands that are not a process's
composition (`aggregator.cli`) nor the upstream's (`aggregator.upstream.command_line`)."""
