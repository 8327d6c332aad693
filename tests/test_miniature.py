"""The paper in miniature, end to end at toy sizes (plumbing: every variant trains, evaluates
and lands in the report; the claims themselves are in docs/miniature)."""

import dataclasses
import json

import pytest

from longlora_jax.experiments.miniature import QUICK, VARIANTS, run_miniature

pytestmark = pytest.mark.integration


def _quality(report):
    return [(row["variant"], row["ppl_mean"]) for row in report["variants"]]


def test_quick_miniature_end_to_end(tmp_path):
    report = run_miniature(tmp_path / "out", QUICK, workdir=tmp_path / "runs")
    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())
    assert [row["variant"] for row in saved["variants"]] == [v.name for v in VARIANTS]
    lengths = {str(n) for n in (QUICK.base_context, QUICK.target, 2 * QUICK.target)}
    for row, variant in zip(saved["variants"], VARIANTS, strict=True):
        assert set(row["ppl_mean"]) == lengths
        assert ("cost" in row) == (variant.mode is not None)
    table = (out / "results.md").read_text()
    assert table.count("\n| ") == len(VARIANTS) and "LoRA+, S2-Attn (LongLoRA)" in table
    for png in ("ppl_vs_length.png", "cost_vs_quality.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # S2 and short attention cost a quarter of full attention's FLOPs at G = N/4 (per query
    # ~G/2 keys instead of ~N/2).
    costs = {row["variant"]: row["cost"] for row in saved["variants"] if "cost" in row}
    full = costs["LoRA+, full attention"]["attention_gflop"]
    assert costs["LoRA+, S2-Attn (LongLoRA)"]["attention_gflop"] == pytest.approx(
        full / 4, rel=0.02)
    # The pretrained base is cached: a second run reuses it (and the finished fine-tunes).
    again = run_miniature(tmp_path / "again", QUICK, workdir=tmp_path / "runs")
    assert _quality(again) == _quality(report)


@pytest.mark.slow
def test_same_seeds_same_numbers(tmp_path):
    """Fresh runs (nothing cached) give the identical quality table."""
    scale = dataclasses.replace(QUICK, seeds=(3,))
    first = run_miniature(tmp_path / "a", scale, workdir=tmp_path / "runs_a")
    second = run_miniature(tmp_path / "b", scale, workdir=tmp_path / "runs_b")
    assert _quality(first) == _quality(second)
