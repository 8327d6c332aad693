"""Training: the run config (`config`) and the paper's recipes (`recipes`), the optimizer
(`optim`), the jitted sharded step (`step`), checkpoints (`checkpoint`), metrics (`metrics`),
one writer per workdir (`lock`), the run loop (`loop`) and the parts it calls (`hooks`:
evaluation, step metrics, saves; `stop`: stop signals, a non-finite loss; `summary`: segments,
summary.json), and the ahead-of-time fit report (`fit`)."""
