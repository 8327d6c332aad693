"""`python -m longlora_jax.bench COMMAND [--config.K=V ...]`, COMMAND one of those below.

Benchmarks measured side by side in one process, printed as a markdown table (`--json PATH`
also writes them):
  attention   our S2-Attn and full causal attention vs the official S2 and fused SDPA in
              PyTorch, forward + backward:
              wall time, compiled FLOPs and temporary memory (`benchmarks.attention`).
  train       tokens/s of our LongLoRA train step vs transformers + PEFT on a SmolLM2-shaped
              model on the same algorithm, with MFU and HFU (`benchmarks.train_step`).
  profile     where one train step's time goes: self time per HLO instruction under the XLA
              profiler, by kind (matmul, copies, ...) and by the code that emitted it
              (`benchmarks.profile`).
  settings    which step settings (frozen dtype x remat x loss chunk) are fastest here,
              side by side, with each one's compiled temporary memory
              (`benchmarks.settings`).
  matmul      the fp32 matmul rate of XLA and of PyTorch on the train step's shapes: the
              ceiling on either step's lead at equal FLOPs (`benchmarks.matmul`).
  quant       bytes of a quantized frozen base (codes, scales, float rest) and the host's
              peak memory while it loads, per scheme (`benchmarks.quant`); with `--measure
              quality`, its perplexity per scheme and against bitsandbytes and hqq
              (`benchmarks.quant_quality`).
  longest     the longest sequence whose LoRA+ training step runs in this machine's memory,
              ours and the peer's, each trial in a watched subprocess (`benchmarks.longest`).
"""

import sys

from longlora_jax.benchmarks import (
    attention,
    longest,
    matmul,
    profile,
    quant,
    settings,
    train_step,
)
from longlora_jax.cli import Command, dispatch


def _command(name, module, renamed=()) -> Command:
    def run(config) -> int:
        module.run(config)  # prints (and with --json writes) its table
        return 0

    return Command(f"bench {name}", module.__doc__, run, default_config=module.default_config,
                   renamed=renamed)


SUBCOMMANDS = {"attention": _command("attention", attention, attention.RENAMED),
               "train": _command("train", train_step, train_step.RENAMED),
               "settings": _command("settings", settings),
               "profile": _command("profile", profile),
               "longest": _command("longest", longest),
               "matmul": _command("matmul", matmul),
               "quant": _command("quant", quant)}

if __name__ == "__main__":
    sys.exit(dispatch("bench", __doc__, SUBCOMMANDS))
