"""`python -m longlora_jax.aot --config configs/X.py --topology v4-8 [--json OUT] [--compare-full]`

Compiles the config's exact training step for a TPU slice from any host (libtpu installed, no
TPU needed) and reports whether it fits: per-chip memory against the usable HBM, compile time,
the attention kernels in the step and its FLOPs (`longlora_jax.training.fit`). A step that does
not fit ends with `error: does not fit: ...` and exit status 1 (after writing the JSON).

    python -m longlora_jax.aot --table runs/aot     # the markdown table of saved reports
"""

import sys

from longlora_jax.cli import Command, run_command
from longlora_jax.training.config import ALIASES, RENAMED, default_config
from longlora_jax.training.fit import fit_report, not_fitting_message, report_table


def _run(config) -> int:
    if config.aot.table:
        print(report_table(config.aot.table))
        return 0
    report = fit_report(config)
    if not report["fits"]:
        print(f"error: {not_fitting_message(report)}", file=sys.stderr)
        return 1
    return 0


COMMAND = Command("aot", __doc__, _run, default_config=default_config,
                  aliases={**ALIASES, "topology": "aot.topology", "json": "aot.json",
                           "compare_full": "aot.compare_full", "table": "aot.table"},
                  renamed=RENAMED)

if __name__ == "__main__":
    sys.exit(run_command(COMMAND))
