"""Experiments that reproduce the paper's claims with the library's own machinery
(`miniature`: the whole paper where context matters, small enough for a laptop CPU, and its
report with the claims decided against the seeds' spread, `miniature_report`)."""
