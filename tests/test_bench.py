"""`python -m longlora_jax.bench` subcommands end to end on tiny shapes (no timing asserted)."""

import json

from longlora_jax.bench import SUBCOMMANDS
from longlora_jax.benchmarks import attention, train_step
from longlora_jax.cli import parse


def test_attention_bench_reports_s2_full_and_torch(tmp_path, capsys):
    out = tmp_path / "bench.json"
    attention.run(parse(SUBCOMMANDS["attention"], [
        "--lengths", "512", "--heads", "4x16/2", "--repeats", "1", "--warmup", "0",
        "--json", str(out)]))
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["N"], row["heads"], row["G"]) == (512, "4x16/2", 128)
    for name in ("s2", "full", "torch"):
        assert row[f"{name} s"] > 0
    # Per-group scores only: S2 needs a fraction of full attention's FLOPs and memory.
    assert row["FLOPs S2/full"] < 0.5
    assert row["temp S2/full"] < 0.5
    table = capsys.readouterr().out
    assert "| N | heads | G | s2 s | full s | torch s |" in table


def test_train_bench_runs_both_steps_side_by_side(tmp_path, capsys):
    out = tmp_path / "bench.json"
    train_step.run(parse(SUBCOMMANDS["train"], [
        "--lengths", "256", "--layers", "1", "--loss-chunk", "128", "--repeats", "1",
        "--warmup", "0", "--json", str(out)]))
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["N"], row["layers"]) == (256, 1)
    for name in ("longlora_jax", "hf_peft"):
        assert row[f"{name} s/step"] > 0
        assert row[f"{name} tokens/s"] == 256 / row[f"{name} s/step"]
    assert row["speedup"] == row["hf_peft s/step"] / row["longlora_jax s/step"]
    assert "| N | layers | remat | longlora_jax s/step |" in capsys.readouterr().out
