"""Parallelism: the mesh and its axis names (`mesh`), THE logical-axis rule table (`rules`),
multi-process start-up (`distributed`) and TPU slices for ahead-of-time compilation
(`topology`). Imports nothing of the project but `errors`."""
