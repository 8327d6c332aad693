"""Evaluation: perplexity with full attention (`perplexity`), passkey retrieval (`passkey`),
long-range task rows scored by distance (`long_range`), models side by side at several
lengths (`compare`), results and plots (`report`, `plots`), RULER's synthetic tasks
(`ruler_tasks` builds them, `ruler` runs and scores them), an lm-evaluation-harness model
(`lm_harness`) and the same RULER tasks as lm-eval tasks (the `lm_eval_tasks` folder)."""
