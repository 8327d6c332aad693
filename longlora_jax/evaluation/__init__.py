"""Evaluation: perplexity with full attention (`perplexity`), passkey retrieval (`passkey`),
long-range task rows scored by distance (`long_range`), models side by side at several
lengths (`compare`), results and plots (`report`, `plots`)."""
