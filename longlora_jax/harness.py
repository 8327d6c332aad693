"""`python -m longlora_jax.harness [lm-eval arguments]`: lm-evaluation-harness on this project's
models.

    python -m longlora_jax.harness --model longlora_jax --model_args model=runs/demo \
        --tasks hellaswag --batch_size 4

Registers lm-eval's `longlora_jax` model (`longlora_jax.evaluation.lm_harness`, where its
model_args are documented) and runs lm-eval's own command line with the same arguments (lm-eval
0.4 finds models only in its registry: a plain `lm_eval` cannot see a third-party one). In
Python, `import longlora_jax.evaluation.lm_harness` registers it for `lm_eval.simple_evaluate`.
Needs the `eval` extra (`pip install .[eval]`). A bad model_args value is one `error:` line and
exit status 2, like every command here.

lm-eval's `--include_path` defaults to this project's offline RULER tasks
(`longlora_jax/evaluation/lm_eval_tasks`: `--tasks ruler_offline` or `ruler_offline_vt`, ...);
a path you give replaces it (lm-eval takes one).
"""

import pathlib
import sys

from longlora_jax.errors import UserError, first_line

try:  # optional: the eval extra
    from lm_eval.__main__ import cli_evaluate

    from longlora_jax.evaluation import lm_harness  # noqa: F401  (registers the model)
except ImportError as err:
    if err.name != "lm_eval":
        raise
    cli_evaluate = None

TASKS_DIR = pathlib.Path(__file__).parent / "evaluation" / "lm_eval_tasks"
UNKNOWN_TASKS = "Tasks not found"  # how lm-eval 0.4 words its ValueError for unknown --tasks


def main(argv: list[str] | None = None) -> int:
    """Runs lm-eval's command line on `argv` (default sys.argv[1:]); returns the exit status."""
    if cli_evaluate is None:
        print("error: lm-eval is not installed; pip install .[eval]", file=sys.stderr)
        return 2
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        args += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    except UserError as err:
        print(f"error: {first_line(err)}", file=sys.stderr, flush=True)
        return 2
    except ValueError as err:  # lm-eval's own refusal of a task name, as one line
        if not str(err).startswith(UNKNOWN_TASKS):
            raise
        print(f"error: {first_line(err)}; `python -m longlora_jax.harness ls tasks` lists "
              "the valid ones", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
