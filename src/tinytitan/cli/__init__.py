"""Command line: one subcommand per pipeline stage, each in its own module."""
