"""Command-line plumbing shared by every command: one scheme and one error convention
(`command`), config files and `--config.a.b=value` overrides (`overrides`), retired key
spellings still accepted for one release (`renames`), and what runs before JAX starts
(`startup`).
"""

from longlora_jax.cli.command import Command, dispatch, parse, run_command

__all__ = ["Command", "dispatch", "parse", "run_command"]
