"""lm-eval task files for the offline RULER tasks: `ruler_offline_<task>` YAMLs (one per task of
`evaluation.ruler_tasks.TASKS`, sharing `_ruler_offline.yaml`) and `ruler_docs` (their
documents and scoring). `python -m longlora_jax.harness` points lm-eval's `--include_path` here.
"""
