"""The train step with the written-out norm backward (`modeling.norms`) against autodiff's.

    PYTHONPATH=. python docs/bench/norms_ab.py [LENGTH ...]   # default 2048 8192

Both variants are `bench train`'s 30-layer SmolLM2-shaped S2 + LoRA+ step (fp32, full remat);
"autodiff" swaps `llama.rms_norm` for the plain formula (the code before the change) while
its step is traced. Timed interleaved in one process (one warm-up, the min of the timed
steps); writes norms_ab.json beside this file.
"""

import contextlib
import json
import pathlib
import sys

import jax
import jax.numpy as jnp

from longlora_jax.benchmarks import train_step
from longlora_jax.benchmarks.common import machine, time_round_robin
from longlora_jax.modeling import llama

OUT = pathlib.Path(__file__).parent
WRITTEN_OUT = llama.rms_norm


def autodiff_rms_norm(x, scale, eps, dtype):
    """The RMSNorm of before the change: the same forward, differentiated by JAX."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(dtype) * normed.astype(dtype)


@contextlib.contextmanager
def norm(fn):
    llama.rms_norm = fn
    try:
        yield
    finally:
        llama.rms_norm = WRITTEN_OUT


def main(lengths: list[int]) -> None:
    rows = []
    for n in lengths:
        config = train_step.default_config()
        config.layers, config.repeats = 30, 2
        variants = []
        for name, fn in (("written out", WRITTEN_OUT), ("autodiff", autodiff_rms_norm)):
            variant = train_step.our_step(n, config)

            def run(step=variant.run, fn=fn):
                with norm(fn):
                    step()

            variant.name, variant.run = name, run
            variants.append(variant)
        time_round_robin(variants, config)
        best = {v.name: min(v.seconds) for v in variants}
        rows.append({"N": n, "written out s/step": best["written out"],
                     "autodiff s/step": best["autodiff"],
                     "speed-up": best["autodiff"] / best["written out"],
                     "seconds": {v.name: v.seconds for v in variants}})
        print(rows[-1], flush=True)
    command = "PYTHONPATH=. python docs/bench/norms_ab.py " + " ".join(map(str, lengths))
    (OUT / "norms_ab.json").write_text(json.dumps(
        {"meta": {**machine(), "command": command, "layers": 30,
                  "model": "SmolLM2-135M shape, LoRA+ r=8, S2 G=N/4, fp32, full remat"},
         "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [2048, 8192])
