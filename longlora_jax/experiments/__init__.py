"""Experiments that reproduce the paper's claims with the library's own machinery
(`miniature`: the whole paper, small enough for a laptop CPU)."""
