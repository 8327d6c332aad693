"""Benchmarks, measured side by side in one process: attention kernels (`attention`) and the
train step against transformers + PEFT (`train_step`); shared timing in `common`."""
