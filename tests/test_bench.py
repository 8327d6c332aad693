"""`python -m longlora_jax.bench` subcommands end to end on tiny shapes (no timing asserted)."""

import json

import pytest

from longlora_jax.bench import SUBCOMMANDS
from longlora_jax.benchmarks import (
    attention,
    longest,
    matmul,
    profile,
    quant,
    settings,
    train_step,
)
from longlora_jax.cli import parse
from longlora_jax.errors import ConfigError

pytestmark = pytest.mark.integration


def test_attention_bench_reports_ours_and_the_torch_peers(tmp_path, capsys):
    out = tmp_path / "bench.json"
    attention.run(parse(SUBCOMMANDS["attention"], [
        "--lengths", "512", "--heads", "4x16/2", "--repeats", "1", "--warmup", "0",
        "--json", str(out)]))
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["N"], row["heads"], row["G"]) == (512, "4x16/2", 128)
    for name in ("s2", "torch_s2", "full", "torch"):
        assert row[f"{name} s"] > 0
    assert row["S2: ours vs torch"] == row["torch_s2 s"] / row["s2 s"]
    assert row["S2 vs full (ours)"] == row["full s"] / row["s2 s"]
    # Per-group scores only: S2 needs a fraction of full attention's FLOPs and memory.
    assert row["FLOPs S2/full"] < 0.5
    assert row["temp S2/full"] < 0.5
    table = capsys.readouterr().out
    assert "| N | heads | G | s2 s | torch_s2 s | full s | torch s |" in table


def test_train_bench_runs_ours_and_both_peers_side_by_side(tmp_path, capsys):
    out = tmp_path / "bench.json"
    train_step.run(parse(SUBCOMMANDS["train"], [
        "--lengths", "256", "--layers", "1", "--loss-chunk", "128", "--repeats", "1",
        "--warmup", "0", "--peers", "s2,full", "--json", str(out)]))
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["N"], row["layers"], row["remat"]) == (256, 1, "full")
    for name in ("longlora_jax", "longlora_jax_full", "hf_peft_s2", "hf_peft_full"):
        assert row[f"{name} s/step"] > 0
        assert row[f"{name} tokens/s"] == 256 / row[f"{name} s/step"]
    assert row["S2: ours vs official"] == row["hf_peft_s2 s/step"] / row["longlora_jax s/step"]
    assert row["S2 vs full (HF)"] == row["hf_peft_full s/step"] / row["hf_peft_s2 s/step"]
    assert "| N | layers | remat | longlora_jax s/step |" in capsys.readouterr().out
    assert row["model GFLOP/step"] < row["executed GFLOP/step"]  # remat is not useful work
    assert row["MFU"] == pytest.approx(
        row["model GFLOP/step"] / row["longlora_jax s/step"] / row["XLA matmul GFLOP/s"])
    assert row["HFU"] / row["MFU"] == pytest.approx(
        row["executed GFLOP/step"] / row["model GFLOP/step"])


def test_settings_bench_times_the_grid_against_its_reference(tmp_path, capsys):
    out = tmp_path / "settings.json"
    settings.run(parse(SUBCOMMANDS["settings"], [
        "--preset", "tiny", "--layers", "2", "--lengths", "256", "--remats", "none,full",
        "--loss-chunks", "128,256", "--reference", "float32,full,256", "--repeats", "1",
        "--warmup", "0", "--json", str(out)]))
    rows = json.loads(out.read_text())["rows"]
    grid = {(r["frozen_dtype"], r["remat"], r["loss_chunk"]): r for r in rows}
    assert len(rows) == len(grid) == 8
    assert grid["float32", "full", 256]["speed vs reference"] == 1.0
    for r in rows:
        assert r["s/step"] == min(r["seconds"]) and r["compile s"] > 0
    for dtype in ("bfloat16", "float32"):  # remat trades recompute for temporaries
        assert grid[dtype, "full", 128]["temp GiB"] < grid[dtype, "none", 128]["temp GiB"]
    assert "| N | frozen_dtype | remat | loss_chunk | s/step |" in capsys.readouterr().out

    # A setting whose temporaries exceed the memory budget is reported, not run.
    settings.run(parse(SUBCOMMANDS["settings"], [
        "--preset", "tiny", "--layers", "1", "--lengths", "256", "--remats", "none",
        "--loss-chunks", "256", "--frozen-dtypes", "float32", "--reference", "float32,none,256",
        "--memory-fraction", "0", "--json", str(out)]))
    (row,) = json.loads(out.read_text())["rows"]
    assert row["s/step"].startswith("temporaries ") and row["seconds"] == []


@pytest.mark.parametrize("flags, message", [
    (["--remats", "most"], "remats=\\('most',\\); valid: one or more of none, full, dots"),
    (["--loss-chunks", "300"], "loss_chunks=\\(300,\\); each must divide every length"),
    (["--reference", "float32,none,4096"], "reference='float32,none,4096' is not in the grid"),
])
def test_settings_bench_refuses_a_bad_grid(flags, message):
    with pytest.raises(ConfigError, match=message):
        settings.run(parse(SUBCOMMANDS["settings"], flags))


def test_profile_bench_accounts_for_the_step_by_kind_and_place(tmp_path, capsys):
    out = tmp_path / "profile.json"
    profile.run(parse(SUBCOMMANDS["profile"], [
        "--lengths", "256", "--layers", "1", "--loss-chunk", "128", "--json", str(out)]))
    (row,) = json.loads(out.read_text())["rows"]
    assert row["N"] == 256 and row["threads"] >= 1 and 0 < row["busy"] <= 1.0
    total = row["op thread-seconds"]
    assert abs(sum(row["by_kind"].values()) - total) < 1e-6 * max(total, 1)
    assert abs(sum(p["thread-seconds"] for p in row["by_place"]) - total) < 1e-6 * max(total, 1)
    places = {p["place"] for p in row["by_place"]}
    assert {"modeling/loss.py:_fused_fwd", "modeling/kernels.py:blocked_grouped_causal"} <= places
    assert row["by_kind"]["matmul"] > 0
    assert "| kind | thread-s | share |" in capsys.readouterr().out


def test_train_bench_refuses_an_unknown_peer():
    with pytest.raises(ConfigError, match="peers=\\('flash',\\); valid: one or more of s2, full"):
        train_step.run(parse(SUBCOMMANDS["train"], ["--peers", "flash"]))


def test_matmul_bench_times_every_product_of_the_step_on_both_sides(tmp_path):
    out = tmp_path / "bench.json"
    matmul.run(parse(SUBCOMMANDS["matmul"], [
        "--tokens", "64", "--loss-chunk", "32", "--repeats", "1", "--warmup", "0",
        "--json", str(out)]))
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3 * len(matmul.PROJECTIONS) + 1
    assert rows[0]["shape"] == "[64,576]x[576,576]" and rows[-1]["product"] == "all of the above"
    for row in rows[:-1]:
        assert row["XLA vs torch"] == pytest.approx(row["XLA GFLOP/s"] / row["torch GFLOP/s"])
    # The total is a time-weighted mean of the products' ratios: it lies between them.
    ratios = [row["XLA vs torch"] for row in rows[:-1]]
    assert min(ratios) <= rows[-1]["XLA vs torch"] <= max(ratios)
    with pytest.raises(ConfigError, match="torch=False: bench matmul measures XLA against torch"):
        matmul.run(parse(SUBCOMMANDS["matmul"], ["--torch=False"]))


def test_longest_context_trials_run_in_watched_subprocesses(tmp_path):
    """Tiny lengths run; a memory budget below what a step needs is a killed trial, reported
    (not a crash) and bisected."""
    config = parse(SUBCOMMANDS["longest"], [
        "--systems", "longlora_jax", "--start", "128", "--max_length", "256", "--layers", "1",
        "--resolution", "64", "--json", str(tmp_path / "a.json")])
    (row,) = longest.run(config)
    assert row["longest N"] == 256 and row["first N that failed"] is None
    assert all(t["ok"] for t in row["trials"]) and row["peak GiB at it"] > 0
    config.memory_gb = 0.05  # a step needs more: killed by the watchdog
    config.max_length = 128
    (row,) = longest.run(config)
    assert row["longest N"] is None and row["first N that failed"] == 128
    assert row["how it failed"] == "killed: over 0.05 GB"


def test_quant_bench_counts_codes_scales_and_float_bytes(tmp_path):
    """Each scheme loaded in its own process; the bytes are exact for the tiny preset (every
    projection has 64 or 128 input rows): int8 = a byte per weight + an fp32 scale per output
    column; int4 = half a byte + an fp32 scale per 64 rows and column = 1/8 + 1/64 of fp32."""
    out = tmp_path / "quant.json"
    rows = quant.run(parse(SUBCOMMANDS["quant"], [
        "--model", "preset:tiny", "--dtype", "float32", "--schemes", "none,int8,int4",
        "--json", str(out)]))
    assert [row["quantize"] for row in json.loads(out.read_text())["rows"]] == [
        "none", "int8", "int4"]
    plain, int8, int4 = rows
    assert plain["codes MiB"] == plain["scales MiB"] == 0 and plain["frozen / ref"] == 1
    assert int8["float MiB"] == int4["float MiB"] < plain["float MiB"]
    assert 0.25 < int8["projections / ref"] <= 0.25 + 1 / 64
    assert int4["projections / ref"] == pytest.approx(1 / 8 + 1 / 64)
    assert int4["codes MiB"] == pytest.approx(int8["codes MiB"] / 2)
