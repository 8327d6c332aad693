"""Perplexity evaluation: equals exp(mean NLL) from transformers on the same windows (both
protocols, one forward or chunked through the KV cache), sequence-sharded equals unsharded on
8 fake devices, and the CLI's outputs and one-line errors.
"""

import json
import textwrap

import numpy as np
import pytest
import torch

from longlora_jax import evaluate
from longlora_jax.cli import run_command
from longlora_jax.data.eval_data import TokenDocument
from longlora_jax.errors import DataError
from longlora_jax.evaluation import compare
from longlora_jax.evaluation import perplexity as ppl_eval
from longlora_jax.evaluation.perplexity import documents_for
from longlora_jax.io.hf import load_pretrained
from longlora_jax.modeling.llama import LlamaForCausalLM
from longlora_jax.parallel.mesh import make_mesh
from tests.helpers import run_python
from tests.test_model_vs_hf import random_hf_model

SEQ_LEN, STRIDE = 32, 8


def hf_window_nll(model, tokens: np.ndarray, protocol: str) -> tuple[float, int]:
    """(summed NLL, scored tokens) over the protocol's windows, from HF's own loss.

    official (eval.py): windows tokens[s : s + L] for s in range(0, T - L, stride)[:-1],
    loss = model(x, labels=x) over L - 1 tokens. nonoverlap: x = tokens[s : s + L + 1] for s in
    range(0, T - L, L), every one of the L next tokens scored.
    """
    total, count = 0.0, 0
    if protocol == "official":
        for s in list(range(0, len(tokens) - SEQ_LEN, STRIDE))[:-1]:
            x = torch.from_numpy(tokens[s:s + SEQ_LEN].astype(np.int64))[None]
            with torch.no_grad():
                loss = model(input_ids=x, labels=x).loss.double().item()
            total, count = total + loss * (SEQ_LEN - 1), count + SEQ_LEN - 1
    else:
        for s in range(0, len(tokens) - SEQ_LEN, SEQ_LEN):
            x = torch.from_numpy(tokens[s:s + SEQ_LEN + 1].astype(np.int64))[None]
            with torch.no_grad():
                logits = model(input_ids=x[:, :-1]).logits.double()
            nll = torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum")
            total, count = total + nll.item(), count + SEQ_LEN
    return total, count


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random GQA HF checkpoint with linear RoPE scaling, and two documents for it."""
    path = tmp_path_factory.mktemp("hf")
    model = random_hf_model({"num_key_value_heads": 2}, "linear")
    model.save_pretrained(path, safe_serialization=True)
    rng = np.random.default_rng(0)
    docs = [TokenDocument(f"doc{i}", rng.integers(0, 256, n).astype(np.int32))
            for i, n in enumerate((150, 97))]
    return model, path, docs


@pytest.mark.parametrize("protocol", ["official", "nonoverlap"])
@pytest.mark.parametrize("prefill_chunk", [0, 8], ids=["one-forward", "kv-chunks"])
def test_perplexity_equals_transformers(tiny_checkpoint, protocol, prefill_chunk):
    model, path, docs = tiny_checkpoint
    cfg, params = load_pretrained(path, config_overrides={"scan_layers": True})
    mesh = make_mesh({"data": 1})
    eval_fn = ppl_eval.make_eval_fn(LlamaForCausalLM(cfg), mesh, loss_chunk=16,
                                    prefill_chunk=prefill_chunk)
    ours = ppl_eval.perplexity(eval_fn, {"params": params}, docs, seq_len=SEQ_LEN,
                               protocol=protocol, stride=STRIDE, batch_size=3)
    nll, count = map(sum, zip(*(hf_window_nll(model, d.tokens, protocol) for d in docs),
                              strict=True))
    want = np.exp(nll / count)
    print(f"{protocol}/{prefill_chunk}: ours {ours['ppl']:.6f} hf {want:.6f} "
          f"({ours['windows']} windows, {ours['tokens']:.0f} tokens)")
    assert ours["tokens"] == count
    assert ours["ppl"] == pytest.approx(want, rel=1e-5)
    assert abs(np.log(want) - np.log(256)) > 0.3  # not a uniform-logit model


@pytest.mark.integration
def test_sequence_sharded_perplexity_equals_unsharded(tiny_checkpoint):
    """The plain forward with tokens split over 8 fake devices (mesh sequence=8, and
    data=2 x sequence=4 with a batch of 2) gives the single-device NLL."""
    _, path, _ = tiny_checkpoint
    out = run_python(textwrap.dedent(f"""
        import jax, numpy as np
        jax.config.update("jax_default_matmul_precision", "highest")
        from longlora_jax.evaluation import perplexity as ppl_eval
        from longlora_jax.io.hf import load_pretrained
        from longlora_jax.io.base import shard_variables as place_variables
        from longlora_jax.modeling.llama import LlamaForCausalLM
        from longlora_jax.parallel.mesh import make_mesh
        cfg, params = load_pretrained({str(path)!r}, config_overrides={{"scan_layers": True}})
        model = LlamaForCausalLM(cfg)
        ids = np.random.default_rng(0).integers(0, 256, (2, 65)).astype(np.int32)
        args = ({{"params": params}}, ids[:, :-1], ids[:, 1:], np.ones((2, 64), np.float32))
        ref = ppl_eval.make_eval_fn(model, make_mesh({{"data": 1}}, jax.devices()[:1]))(*args)
        for shape in ({{"data": 1, "sequence": 8}}, {{"data": 2, "sequence": 4}}):
            mesh = make_mesh(shape)
            placed = place_variables(cfg, args[0], mesh)
            nll, count = ppl_eval.make_eval_fn(model, mesh, loss_chunk=4)(placed, *args[1:])
            print(shape["sequence"], float(nll), float(ref[0]), float(count), float(ref[1]))
    """), devices=8)
    rows = [line.split() for line in out.strip().splitlines()]
    assert len(rows) == 2
    for _, nll, ref, count, ref_count in rows:
        assert float(count) == float(ref_count) == 128
        assert float(nll) == pytest.approx(float(ref), rel=1e-5)


# ------------------------------------------------------------------------------ CLI

TINY = ["--model", "preset:tiny", "--data", "offline_essays",
        "--config.eval.max_windows=1"]


def run_cli(capsys, *argv):
    """(exit code, stdout, last stderr line: the error; TFDS progress bars may precede it)."""
    code = run_command(evaluate.COMMAND, list(argv))
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1] if captured.err.strip() else ""
    return code, captured.out, last


@pytest.mark.integration
def test_a_stopped_run_keeps_its_finished_lengths_and_the_same_command_resumes(
        capsys, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    measure = compare.perplexity

    def stopped_at_512(*args, seq_len, **kwargs):
        if seq_len == 512:
            raise KeyboardInterrupt  # the user's Ctrl-C, or the machine taken away
        return measure(*args, seq_len=seq_len, **kwargs)

    monkeypatch.setattr(compare, "perplexity", stopped_at_512)
    with pytest.raises(KeyboardInterrupt):
        run_cli(capsys, *TINY, "--lengths", "384,512", "--out", str(out))
    partial = json.loads((out / "partial.json").read_text())
    assert partial["complete"] is False and list(partial["models"][0]["perplexity"]) == ["384"]
    assert sorted(p.name for p in out.iterdir()) == ["partial.json"]  # nothing posing as done

    # Other settings would mix two runs: one line, and the partial file stays.
    code, _, err = run_cli(capsys, *TINY, "--lengths", "384,640", "--out", str(out))
    assert code == 2 and "from a stopped run with other settings (differing: lengths)" in err
    assert json.loads((out / "partial.json").read_text()) == partial

    # The same command resumes: 384 is kept (not measured again), 512 is measured.
    lengths_measured = []

    def counted(*args, seq_len, **kwargs):
        lengths_measured.append(seq_len)
        return measure(*args, seq_len=seq_len, **kwargs)

    monkeypatch.setattr(compare, "perplexity", counted)
    code, stdout, err = run_cli(capsys, *TINY, "--lengths", "384,512", "--out", str(out))
    assert code == 0, err
    assert lengths_measured == [512] and "384 tokens | kept from partial.json" in stdout
    assert not (out / "partial.json").exists()
    done = json.loads((out / "results.json").read_text())["models"][0]["perplexity"]
    assert done["384"] == partial["models"][0]["perplexity"]["384"]
    assert set(done) == {"384", "512"}


@pytest.mark.integration
def test_cli_writes_tables_and_plots(capsys, tmp_path):
    out = tmp_path / "eval"
    # "default" and the second "linear:2" repeat "base" and "linear:2": each variant runs once.
    code, stdout, err = run_cli(capsys, *TINY, "--lengths", "384,512",
                                "--rope", "base,linear:2,default,linear:2", "--passkey", "1",
                                "--out", str(out), "--prefill-chunk", "128")
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    names = [m["name"] for m in results["models"]]
    assert names == ["preset:tiny", "preset:tiny (rope linear:2)"]
    first = results["models"][0]
    assert first["context_window"] == 1024 and results["models"][1]["context_window"] == 2048
    assert set(first["perplexity"]) == set(first["passkey"]) == {"384", "512"}
    assert all(p["windows"] == 1 and np.isfinite(p["ppl"]) for p in first["perplexity"].values())
    assert all(p["trials"] == 1 and p["prompt_tokens"] <= 384 for p in [first["passkey"]["384"]])
    table = (out / "results.md").read_text()
    assert "| preset:tiny | default | full | 1024 |" in table
    assert "| linear:2 | full | 2048 |" in table
    assert "beyond the model's context window" not in table  # every length fits
    for png in ("ppl_vs_length.png", "passkey_vs_length.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Perplexity" in stdout


@pytest.mark.parametrize("argv, expected", [
    (["--lengths", "2048"], "exceed the context window 1024"),
    (["--lengths", "128", "--rope", "linear:0.5"], "rope 'linear:0.5'"),
    (["--lengths", "128", "--rope", "none"], "rope 'none'; valid: base | default"),
    (["--lengths", "12a"], "config key lengths: '12a' is not an integer"),
    (["--lengths", "128", "--config.eval.protocol=sliding"], "eval.protocol='sliding'"),
    (["--lengths", "64", "--passkey", "1", "--perplexity=false"], "shorter than the prompt"),
    (["--lengths", "64", "--max-windws", "2"], "unknown option --max-windws"),
])
def test_cli_bad_input_is_one_line(capsys, argv, expected):
    code, _, err = run_cli(capsys, *TINY, *argv)
    assert code == 2
    assert err.startswith("error:") and expected in err


def test_cli_beyond_context_needs_the_flag(capsys):
    code, stdout, err = run_cli(capsys, *TINY, "--lengths", "1536", "--allow-beyond-context",
                                "--prefill-chunk", "512")
    assert code == 0, err
    assert "1536" in stdout and "*" in stdout.split("| preset:tiny |")[1].splitlines()[0]


@pytest.mark.integration
def test_cli_evaluates_s2_and_short_attention(capsys, tmp_path):
    """The paper's Table 1 pilot: the same model under full, S2 and short attention."""
    out = tmp_path / "eval"
    code, stdout, err = run_cli(capsys, *TINY, "--lengths", "256",
                                "--config.attention.eval=full,s2,short", "--out", str(out))
    assert code == 0, err
    models = json.loads((out / "results.json").read_text())["models"]
    assert [m["attention"] for m in models] == ["full", "s2", "short"]
    assert [m["name"] for m in models] == ["preset:tiny", "preset:tiny [s2]",
                                           "preset:tiny [short]"]
    ppl = [m["perplexity"]["256"]["ppl"] for m in models]
    assert len(set(ppl)) == 3 and all(np.isfinite(ppl))
    assert "| preset:tiny [s2] | default | s2 | 1024 |" in stdout


def test_short_attention_of_one_group_is_full_attention(tiny_checkpoint):
    """S2 without the shift over groups as long as the window is exactly full attention; S2
    with the shift (half the heads in two halves) is not."""
    _, path, _ = tiny_checkpoint
    cfg, params = load_pretrained(path, config_overrides={"s2_group_size_ratio": 1.0})
    ids = np.random.default_rng(0).integers(0, 256, (2, 33)).astype(np.int32)
    args = ({"params": params}, ids[:, :-1], ids[:, 1:], np.ones((2, 32), np.float32))
    mesh = make_mesh({"data": 1})
    full, short, s2 = (float(ppl_eval.make_eval_fn(LlamaForCausalLM(cfg), mesh,
                                                   attention=a)(*args)[0])
                       for a in ("full", "short", "s2"))
    assert short == pytest.approx(full, rel=1e-6) and abs(s2 - full) > 1e-3 * full


def test_cli_empty_or_short_documents(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "--model", "preset:tiny", "--data", "text_files",
                           f"--config.data.paths={empty}", "--lengths", "64")
    assert code == 2 and err.startswith("error:") and "matches no file" in err
    (tmp_path / "short.txt").write_text("far too short")
    code, _, err = run_cli(capsys, "--model", "preset:tiny", "--data", "text_files",
                           f"--config.data.paths={tmp_path / 'short.txt'}", "--lengths", "64")
    assert code == 2 and err.startswith("error:") and "no document is long enough" in err
    with pytest.raises(DataError, match="empty"):
        documents_for([], 64, "nonoverlap", 256)


@pytest.mark.integration
def test_workdir_model_applies_the_trained_adapters(capsys, tmp_path):
    """`--model WORKDIR` evaluates base + trained LoRA factors: the same perplexity as the
    merged weights, and not the base's."""
    from longlora_jax.data.eval_data import eval_documents
    from longlora_jax.io.run import load_model
    from longlora_jax.modeling.lora import merge_lora
    from longlora_jax.training.loop import train
    from tests.helpers import REPO_ROOT, train_config

    workdir = tmp_path / "run"
    config = train_config(
        f"{REPO_ROOT}/configs/tiny_cpu.py", "--config.seq_len=128",
        "--config.batch.global_batch=2", "--config.eval.before=False",
        "--config.eval.after=False", "--config.checkpoint.async_save=False",
        "--config.data.prefetch=0", "--config.max_steps=2", "--config.optim.lr=1e-2",
    )
    train(config, workdir)
    out = tmp_path / "eval"
    code, _, err = run_cli(capsys, "--model", str(workdir), "--data", "offline_essays",
                           "--lengths", "128", "--config.eval.max_windows=2", "--out", str(out))
    assert code == 0, err
    ppl_cli = json.loads((out / "results.json").read_text())["models"][0]["perplexity"]["128"]

    loaded = load_model(str(workdir))
    assert loaded.cfg.lora_rank == 8 and loaded.variables.get("lora")
    docs = eval_documents(config.data, loaded.tokenizer)
    mesh = make_mesh({"data": 1})

    def ppl(cfg, variables):
        fn = ppl_eval.make_eval_fn(LlamaForCausalLM(cfg), mesh)
        return ppl_eval.perplexity(fn, variables, docs, seq_len=128, max_windows=2)["ppl"]

    merged_cfg, merged = merge_lora(loaded.cfg, loaded.variables)
    with_merged = ppl(merged_cfg, {"params": merged})
    base_only = ppl(loaded.cfg, {"params": loaded.variables["params"]})
    print(f"workdir {ppl_cli['ppl']:.5f} merged {with_merged:.5f} base {base_only:.5f}")
    assert ppl_cli["ppl"] == pytest.approx(with_merged, rel=1e-5)
    assert abs(ppl_cli["ppl"] - base_only) > 1e-3 * base_only


@pytest.mark.parametrize("rope, window", [
    (None, 4096),
    ({"rope_type": "linear", "factor": 4.0}, 16384),
    ({"rope_type": "dynamic", "factor": 2.0}, 8192),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}, 16384),
    # HF's llama3 configs (Llama 3.1) carry the extended length in max_position_embeddings
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 512}, 4096),
])
def test_context_window_of_each_rope_scaling(rope, window):
    from longlora_jax.modeling.config import LlamaConfig

    assert LlamaConfig.preset("llama2-7b", rope_scaling=rope).context_window == window
