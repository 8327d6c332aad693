"""QLoRA recovery on the demo (docs/qlora.md, "Fine-tuning on a 4-bit base"; recovery.json).

    PYTHONPATH=. python docs/qlora/recovery.py [NAME ...]   # all runs when none is named

Each run is the README's demo (`configs/demo_cpu.py`: SmolLM2, PI x4, S2-Attn + LoRA+ at 2048
tokens) with one change: the frozen projections' scheme (`model.quantize`), the LoRA targets
(attention only, as LongLoRA; or every projection, as QLoRA), a projection kept float
(`model.quantize_skip`), the steps or the seed. It trains
in runs/qlora_recovery/NAME (a finished run is not trained again) and its summary.json holds
the held-out perplexity before and after (full attention, 2048 tokens, the demo's 4 windows).
recovery.json collects them with each run's gap to the float base run (seed 0) of the same
targets and steps (for the float run of seed 1: the seeds' spread); recovery.md is the table
docs/qlora.md quotes.
"""

import json
import pathlib
import subprocess
import sys

ATTENTION = "q_proj,k_proj,v_proj,o_proj"
EVERY = ATTENTION + ",gate_proj,up_proj,down_proj"
# name: (quantize, projections kept float, LoRA targets, steps, seed)
RUNS = {
    "float": ("none", "", ATTENTION, 20, 0),
    "float_seed1": ("none", "", ATTENTION, 20, 1),
    "nf4": ("nf4", "", ATTENTION, 20, 0),
    "hqq4": ("hqq4", "", ATTENTION, 20, 0),
    "nf4_float_down": ("nf4", "down_proj", ATTENTION, 20, 0),
    "float_all": ("none", "", EVERY, 20, 0),
    "nf4_all": ("nf4", "", EVERY, 20, 0),
    "hqq4_all": ("hqq4", "", EVERY, 20, 0),
    "float_80": ("none", "", ATTENTION, 80, 0),
    "nf4_80": ("nf4", "", ATTENTION, 80, 0),
}
ROOT = pathlib.Path("runs/qlora_recovery")
OUT = pathlib.Path(__file__).parent


def train(name: str) -> dict:
    quantize, skip, targets, steps, seed = RUNS[name]
    workdir = ROOT / name
    summary = workdir / "summary.json"
    if not summary.exists():
        subprocess.run([
            sys.executable, "-m", "longlora_jax.train", "--config", "configs/demo_cpu.py",
            "--workdir", str(workdir), f"--config.model.quantize={quantize}",
            f"--config.model.quantize_skip={skip}", f"--config.lora.targets={targets}",
            f"--config.max_steps={steps}", f"--config.seed={seed}",
            f"--config.checkpoint.every={steps}"], check=True)
    result = json.loads(summary.read_text())
    return {"name": name, "quantize": quantize, "float_projections": skip or "-",
            "targets": "attention" if targets == ATTENTION else "every projection",
            "steps": steps, "seed": seed,
            "ppl_before": result["eval_before"]["ppl"], "ppl_after": result["eval_after"]["ppl"],
            "train_seconds": result["train_seconds"]}


def main(names: list[str]) -> None:
    for name in names or RUNS:
        train(name)
    rows = [train(name) for name in RUNS if (ROOT / name / "summary.json").exists()]
    floats = {(r["targets"], r["steps"]): r for r in rows
              if r["quantize"] == "none" and r["seed"] == 0}
    lines = ["| run | frozen projections | kept float | LoRA on | steps | seed | ppl before "
             "| before vs float run | ppl after | after vs float run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = floats.get((r["targets"], r["steps"]))
        for when in ("before", "after"):
            r[f"gap_{when}"] = (r[f"ppl_{when}"] / base[f"ppl_{when}"] - 1) if base else None

        def gap(when, r=r, base=base):
            return "-" if base is None or base is r else f"{100 * r[f'gap_{when}']:+.1f}%"

        lines.append(f"| {r['name']} | {r['quantize']} | {r['float_projections']} "
                     f"| {r['targets']} | {r['steps']} | {r['seed']} | {r['ppl_before']:.2f} "
                     f"| {gap('before')} | {r['ppl_after']:.2f} | {gap('after')} |")
    command = "PYTHONPATH=. python docs/qlora/recovery.py"
    (OUT / "recovery.json").write_text(json.dumps({"command": command, "runs": rows},
                                                  indent=2) + "\n")
    (OUT / "recovery.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
