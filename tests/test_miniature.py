"""The long-range miniature: the report's claims logic on made-up numbers (fast), and the
whole experiment end to end at toy sizes (tier two: every variant trains, is measured and
lands in the report; the claims themselves are in docs/miniature)."""

import json

import pytest

from longlora_jax.experiments.miniature import QUICK, VARIANTS, run_miniature
from longlora_jax.experiments.miniature_report import compare, niah_accuracy, repeat_ppl


def test_a_claim_within_the_seeds_spread_is_not_decided():
    summary = {"a": {"1x": {"text_ppl": (10.0, 0.5)}}, "b": {"1x": {"text_ppl": (10.4, 0.2)}},
               "c": {"1x": {"text_ppl": (11.0, 0.2)}}}
    assert compare(summary, "a", "b", "text_ppl", "1x",
                   higher_is_better=False)["verdict"] == "not decided"
    for a, b, verdict in (("a", "c", "holds"), ("c", "a", "fails")):
        assert compare(summary, a, b, "text_ppl", "1x",
                       higher_is_better=False)["verdict"] == verdict


def test_pooled_accuracy_weights_rows_and_repeat_ppl_is_a_geometric_mean():
    result = {"niah_single": {"16-64": {"rows": 4, "accuracy": 1.0}},
              "niah_multikey": {"16-64": {"rows": 2, "accuracy": 0.25},
                                "64-128": {"rows": 2, "accuracy": 0.0}},
              "repeat": {"16-64": {"rows": 3, "ppl": 2.0}, "64-128": {"rows": 3, "ppl": 8.0}}}
    assert niah_accuracy(result) == pytest.approx(4.5 / 8)
    assert niah_accuracy(result, "16-64") == pytest.approx(4.5 / 6)
    assert repeat_ppl(result) == pytest.approx(4.0)
    assert repeat_ppl(result, "64-128") == pytest.approx(8.0)


@pytest.mark.integration
def test_quick_miniature_end_to_end(tmp_path):
    report = run_miniature(tmp_path / "out", QUICK, workdir=tmp_path / "runs")
    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())
    assert [row["variant"] for row in saved["variants"]] == [v.name for v in VARIANTS]
    lengths = list(saved["lengths"])
    for row, variant in zip(saved["variants"], VARIANTS, strict=True):
        assert ("cost" in row) == (variant.mode is not None)
        for per_seed in row["results"].values():
            for result in per_seed.values():
                assert set(result["ppl"]) == {str(n) for n in (QUICK.base_context,
                                                                QUICK.target, 2 * QUICK.target)}
                assert {"niah_single", "repeat"} <= set(result["tasks"])
                assert result["sparse"]["attention"] == variant.eval_sparse
        if variant.mode is not None:
            assert set(saved["summary"][variant.name]) == set(lengths)
    assert {c["verdict"] for c in saved["claims"]} <= {"holds", "fails", "not decided"}
    table = (out / "results.md").read_text()
    assert "## Claims" in table and "LoRA+, S2-Attn + sinks" in table
    for png in ("accuracy_vs_distance.png", "recovery_vs_cost.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # S2 and short attention cost about a quarter of full attention's FLOPs at G = N/4
    costs = {row["variant"]: row["cost"] for row in saved["variants"] if "cost" in row}
    full = costs["LoRA+, full attention"]["attention_gflop"]
    assert costs["LoRA+, S2-Attn (LongLoRA)"]["attention_gflop"] < full / 3
    # The pretrained base and the finished fine-tunes are cached: a rerun gives the same table
    again = run_miniature(tmp_path / "again", QUICK, workdir=tmp_path / "runs")
    assert again["variants"] == report["variants"]
