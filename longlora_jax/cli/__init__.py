"""Command-line plumbing shared by every command (see `cli.command`)."""

from longlora_jax.cli.command import Command, dispatch, parse, run_command

__all__ = ["Command", "dispatch", "parse", "run_command"]
