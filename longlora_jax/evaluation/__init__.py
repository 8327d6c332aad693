"""Evaluation: perplexity with full attention (`perplexity`), passkey retrieval (`passkey`),
models side by side at several lengths (`compare`), results and plots (`report`, `plots`)."""
