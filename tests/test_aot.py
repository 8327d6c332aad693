"""Ahead-of-time compilation for TPU slices (libtpu, no TPU) and the paper configs.

TPU compiles run in a child process (libtpu and the topology's compile-only devices stay out
of the test process). The default run compiles a tiny config for v4-8 (v4:2x2x1); the real
LLaMA sizes are `slow` (minutes each on a CPU host).
"""

import json
import math
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from longlora_jax import aot
from longlora_jax.cli import run_command
from longlora_jax.errors import ConfigError
from longlora_jax.modeling.attention import causal_attention
from longlora_jax.parallel.mesh import resolve_mesh_shape
from longlora_jax.parallel.topology import parse_topology
from longlora_jax.training import fit, recipes
from longlora_jax.training.config import batch_sizes, model_config
from longlora_jax.training.loop import train
from tests.helpers import REPO_ROOT, run_python, train_config

GIB = 1024**3
TINY = os.path.join(REPO_ROOT, "configs", "tiny_cpu.py")
TINY_TPU = ["--config.seq_len=1024", "--config.model.dtype=bfloat16", "--config.mesh.data=1",
            "--config.mesh.fsdp=2", "--config.mesh.sequence=2"]

# The paper configs and the TPU slice each one is laid out for.
PAPER = {
    "llama2_7b_8k": ("v4-8", 8192), "llama2_7b_16k": ("v4-8", 16384),
    "llama2_7b_32k": ("v4-8", 32768), "llama2_7b_100k": ("v4-8", 100_000),
    "llama2_13b_65k": ("v4-8", 65536), "llama2_70b_32k": ("v4-16", 32768),
    "llama3_8b_64k": ("v4-8", 65536), "longalpaca_sft_16k": ("v4-8", 16384),
    # the other families
    "mistral_7b_32k": ("v4-8", 32768), "qwen25_7b_32k": ("v4-8", 32768),
    "pythia_6_9b_16k": ("v4-8", 16384),
    # QLoRA: the 70B run with an NF4 frozen base, on half the chips
    "llama2_70b_32k_qlora": ("v4-8", 32768),
}


def _aot(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO_ROOT}
    return subprocess.run([sys.executable, "-m", "longlora_jax.aot", *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


# ----------------------------------------------------------------------------- topology


@pytest.mark.parametrize("name, grid, chips, libtpu", [
    ("v4-8", (2, 2, 1), 4, "v4:2x2x1"),
    ("v4-16", (2, 2, 2), 8, "v4:2x2x2"),
    ("v4-128", (4, 4, 4), 64, "v4:4x4x4"),
    ("v4:2x2x2", (2, 2, 2), 8, "v4:2x2x2"),
    ("v5p-32", (2, 2, 4), 16, "v5:2x2x4"),
    ("v5p:1x1x1", (1, 1, 1), 1, "v5:1x1x1"),
])
def test_parse_topology(name, grid, chips, libtpu):
    tpu = parse_topology(name)
    assert (tpu.grid, tpu.chips, tpu.topology_name) == (grid, chips, libtpu)
    assert tpu.accelerator_type == f"{tpu.generation}-{2 * chips}"


@pytest.mark.parametrize("name", ["v9-8", "v4-6", "v4-12", "tpu", "v4:2x2", "v4:0x2x2",
                                  "v4:3x2x1", ""])
def test_unknown_topology(name):
    with pytest.raises(ConfigError, match=r"unknown TPU topology .*; valid: .*v4-8"):
        parse_topology(name)


def test_tpu_attention_is_splash():
    config = train_config(TINY)
    assert config.attention.impl == "auto"
    assert fit.for_tpu(config).attention.impl == "splash"
    config = ml_collections.ConfigDict(config.to_dict())
    config.attention.impl = "cudnn"
    with pytest.raises(ConfigError, match="GPU-only"):
        fit.for_tpu(config)


def test_attention_detector_sees_the_xla_reference():
    """The check that a TPU step has no XLA softmax would catch the reference kernel."""

    def attention(q, k, v):
        with jax.named_scope("self_attn"):
            return causal_attention(q, k, v, impl="xla")

    q = jnp.ones((1, 256, 4, 16), jnp.float32)
    text = jax.jit(attention).lower(q, q, q).compile().as_text()
    # one softmax per query block: 256 tokens are two blocks of 128 (`kernels.default_block`)
    assert fit.attention_kernels(text) == {"splash": 0, "xla_softmax": 2}


def test_keys_per_query_with_a_sliding_window():
    """Counted against every query of a causal group of 10 with window 4: 1,2,3,4,4,...,4."""
    assert fit.keys_per_query(10) == sum(range(1, 11)) / 10
    assert fit.keys_per_query(10, 4) == (1 + 2 + 3 + 4 * 7) / 10
    assert fit.keys_per_query(10, 16) == fit.keys_per_query(10)


def test_model_flops_s2_vs_full():
    """Full causal attention sees ~N/2 keys per query, S2 ~G/2 = N/8."""
    config = train_config(os.path.join(REPO_ROOT, "configs", "llama2_7b_32k.py"))
    cfg, _ = model_config(config)
    tokens, n, g = 64 * 32768, 32768, 8192
    s2 = fit.model_flops(cfg, tokens=tokens, seq_len=n, mode="lora_plus")
    full = fit.model_flops(cfg.replace(attention_train="full"), tokens=tokens, seq_len=n,
                           mode="lora_plus")
    # forward 4 Hq D per key, x (1 + 2.5 backward + 1 remat)
    per_key = 4 * cfg.num_attention_heads * cfg.head_dim * tokens * cfg.num_hidden_layers * 4.5
    assert math.isclose(full - s2, per_key * (n - g) / 2, rel_tol=1e-9)


def test_model_flops_without_recompute_is_mfu_counting():
    """MaxText's MFU counts no remat forward and a 2x (not 2.5x, flash) attention backward:
    the difference is exactly the layers' forward once more plus half an attention forward."""
    config = train_config(os.path.join(REPO_ROOT, "configs", "llama2_7b_32k.py"))
    cfg, _ = model_config(config)
    assert cfg.remat_policy == "full"
    tokens, n = 8 * 32768, 32768
    hfu = fit.model_flops(cfg, tokens=tokens, seq_len=n, mode="lora_plus")
    mfu = fit.model_flops(cfg, tokens=tokens, seq_len=n, mode="lora_plus", recompute=False)
    dims = cfg.projections()
    layer_forward = 2 * tokens * cfg.num_hidden_layers * sum(
        a * b + (cfg.lora_rank * (a + b) if name in cfg.lora_targets else 0)
        for name, (a, b) in dims.items())
    attention_forward = (4 * cfg.num_attention_heads * cfg.head_dim * tokens
                         * fit.keys_per_query(cfg.s2_group(n)) * cfg.num_hidden_layers)
    assert math.isclose(hfu - mfu, layer_forward + 1.5 * attention_forward, rel_tol=1e-9)


FLOPS_MODELS = {  # preset: its LoRA targets and size overrides for the cost comparison
    "tiny": (("q_proj", "k_proj", "v_proj", "o_proj"), {"num_key_value_heads": 2}),
    "tiny-gpt-neox": (("query_key_value", "dense"), {}),
}


@pytest.mark.integration
@pytest.mark.parametrize(("attention", "preset"), [("s2", "tiny"), ("full", "tiny"),
                                                   ("s2", "tiny-gpt-neox")])
def test_model_flops_match_xla_cost_analysis(attention, preset):
    """Where XLA sees every FLOP (layers unrolled, no accumulation loop, XLA attention), its
    cost analysis and the counted model FLOPs agree (LLaMA; GPT-NeoX's fused projections)."""
    targets, overrides = FLOPS_MODELS[preset]
    config = train_config(TINY, "--config.model.scan=False", "--config.model.remat=none",
                        "--config.attention.impl=xla", f"--config.attention.train={attention}",
                        "--config.seq_len=512", "--config.batch.global_batch=2",
                        "--config.mesh.data=1", f"--config.model.base=preset:{preset}")
    config.unlock()
    config.lora.targets = targets
    config.model.overrides = {"hidden_size": 256, "intermediate_size": 512,
                              "num_attention_heads": 4, "vocab_size": 512,
                              "max_position_embeddings": 512, **overrides}
    from longlora_jax.parallel.mesh import make_mesh
    from longlora_jax.training.config import build_setup

    setup, _, batch = build_setup(config, make_mesh({"data": 1}))
    xla = setup.lower(batch, 512).compile().cost_analysis()["flops"]
    counted = fit.model_flops(setup.model.cfg, tokens=batch * 512, seq_len=512,
                              mode="lora_plus")
    # XLA's blocked kernel computes whole diagonal blocks (more than the causal half)
    assert counted == pytest.approx(xla, rel=0.15)


# ----------------------------------------------------------------------------- compile


@pytest.mark.integration
def test_compile_tiny_for_v4_8_uses_splash(tmp_path):
    out = tmp_path / "report.json"
    proc = _aot("--config", TINY, "--topology", "v4-8", "--json", str(out), *TINY_TPU,
                timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["fits"] is True and report["hbm_bytes"] == 32 * GIB
    assert report["usable_hbm_bytes"] == int(30.75 * GIB)
    assert report["chips"] == 4 and report["topology_name"] == "v4:2x2x1"
    assert report["mesh"] == {"data": 1, "fsdp": 2, "sequence": 2, "tensor": 1}
    assert report["attention_impl"] == "splash"
    # the compiled step runs S2 through the splash kernels, with no XLA softmax in attention
    assert report["kernels"]["splash"] > 0 and report["kernels"]["xla_softmax"] == 0
    parts = report["per_chip"]
    assert report["per_chip_bytes"] == (parts["arguments"] + parts["outputs"] - parts["aliased"]
                                        + parts["temp"] + parts["code"])
    # the state is donated: its buffers are reused for the new state
    assert parts["aliased"] > 0
    assert parts["arguments"] >= sum(report["arguments_bytes"].values())
    assert report["compile_seconds"] > 0 and report["xla_flops"] > 0
    assert report["est_step_seconds"] == pytest.approx(report["model_flops"] / 275e12)
    assert "fits" in proc.stdout and "splash kernels" in proc.stdout


def test_cli_unknown_topology(capsys):
    assert run_command(aot.COMMAND, ["--config", TINY, "--topology", "v9-8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: unknown TPU topology 'v9-8'; valid:")


def test_cli_mesh_does_not_match_slice(capsys):
    argv = ["--config", TINY, "--topology", "v4-8", "--config.mesh.data=8"]
    assert run_command(aot.COMMAND, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: config mesh ") and "does not match v4-8 (4 chips)" in err
    assert "'data': 8" in err


def test_cli_does_not_fit(tmp_path):
    """4096 sequences of 4096 tokens per step on four chips: the activations alone are ~100x
    HBM, and the report names them as the biggest part."""
    out = tmp_path / "report.json"
    proc = _aot("--config", TINY, "--topology", "v4-8", "--json", str(out),
                "--config.seq_len=4096", "--config.batch.global_batch=4096",
                "--config.mesh.data=1", "--config.mesh.fsdp=4", timeout=600)
    assert proc.returncode == 1
    line = _error_line(proc)
    assert line.startswith("error: does not fit: ") and " GiB > 30.75 GiB per chip on v4-8" in line
    assert "(usable of 32 GiB HBM; biggest: activations/temporaries" in line
    report = json.loads(out.read_text())
    assert report["fits"] is False and report["per_chip_bytes"] > report["usable_hbm_bytes"]


def test_out_of_memory_messages():
    temp = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
            "temporaries (259.17G) exceeds available HBM (30.75G).")
    assert fit._oom_bytes(temp) == {"temp": int(259.17 * GIB)}
    used = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
            "space hbm. Used 45.60G of 30.75G hbm. Exceeded hbm capacity by 14.85G.")
    assert fit._oom_bytes(used) == {"used": int(45.6 * GIB)}
    assert fit._oom_bytes("INTERNAL: something else") is None


def test_table_from_reports(tmp_path):
    base = {"config": "configs/x.py", "topology": "v4-8", "chips": 4, "seq_len": 32768,
            "mesh": {"data": 1, "fsdp": 1, "sequence": 4, "tensor": 1}, "global_batch": 64,
            "micro_batch": 1, "params": 6.7e9, "per_chip_bytes": 12 * GIB, "fits": True,
            "hbm_bytes": 32 * GIB, "est_step_seconds": 93.6, "compile_seconds": 400.0}
    full = {**base, "per_chip_bytes": 40 * GIB, "fits": False, "est_step_seconds": 150.0}
    path = tmp_path / "r.json"
    path.write_text(json.dumps({**base, "full_attention": full}))
    table = fit.markdown_table([json.loads(path.read_text())])
    row = table.splitlines()[2]
    assert "| v4-8 (4) | 1/1/4/1 | 32768 | 64 (1) | 6.7B |" in row
    assert "12.0 GiB, fits, ≥93.6 s" in row and "40.0 GiB, **does not fit**, ≥150.0 s" in row
    failed = fit.markdown_table([{**base, "full_attention": {"error": "NotImplementedError: x"}}])
    assert "compile failed (NotImplementedError: x)" in failed


# ----------------------------------------------------------------------------- paper configs


@pytest.mark.parametrize("name", sorted(PAPER))
@pytest.mark.parametrize("variant", ["tpu", "gpu"])
def test_paper_config(name, variant):
    topology, seq_len = PAPER[name]
    path = os.path.join(REPO_ROOT, "configs", f"{name}.py")
    config = train_config(f"{path}:{variant}")
    assert config.seq_len == seq_len
    lr = 1e-5 if name.startswith("llama2_70b") else 2e-5  # the paper, section 4.1
    assert (config.optim.lr, config.lora.rank, config.lora.mode) == (lr, 8, "lora_plus")
    assert config.model.tokenizer == "auto"  # a real base's own tokenizer
    assert config.aot.topology == (topology if variant == "tpu" else "")
    assert (config.attention.train, config.attention.group_size_ratio) == ("s2", 0.25)
    assert config.batch.global_batch == 64 and config.model.frozen_dtype == "bfloat16"
    devices = parse_topology(topology).chips if variant == "tpu" else 8
    shape = resolve_mesh_shape(dict(config.mesh), devices)
    assert math.prod(shape.values()) == devices
    model_config(config)  # S2 groups fit the sequence shards
    global_batch, accum = batch_sizes(config, types.SimpleNamespace(shape=shape))
    assert global_batch == 64 and accum == 64 // config.batch.micro_batch


def test_paper_config_bad_variant():
    with pytest.raises(ConfigError, match="variant 'h100'; valid: tpu, gpu"):
        recipes.longlora("llama2-7b", 8192, "h100", tpu=recipes.Layout({}, 1),
                         gpu=recipes.Layout({}, 1))


@pytest.mark.integration
def test_sequence_tensor_layout_trains_like_one_device(tmp_path):
    """The 70B layout (sequence x tensor, residual stream split over tensor) on 8 fake CPU
    devices gives the single-device losses."""
    args = ["--config", TINY, "--config.seq_len=128", "--config.max_steps=2",
            "--config.batch.global_batch=2", "--config.batch.micro_batch=1",
            "--config.model.frozen_dtype=float32", "--config.eval.before=False",
            "--config.eval.after=False", "--config.checkpoint.every=0",
            "--config.data.prefetch=0"]
    code = f"""
    import json, pathlib, tempfile
    from longlora_jax.training.loop import train
    from tests.helpers import train_config
    workdir = pathlib.Path(tempfile.mkdtemp())
    mesh = ["--config.mesh.data=1", "--config.mesh.sequence=4", "--config.mesh.tensor=2"]
    train(train_config(*{args[1:]!r}, *mesh), workdir)
    print(json.dumps([json.loads(l)["loss"] for l in (workdir / "metrics.jsonl").read_text()
                      .splitlines()]))
    """
    eight = json.loads(run_python(code, devices=8).splitlines()[-1])
    train(train_config(*args[1:], "--config.mesh.data=1"), tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    one = [json.loads(line)["loss"] for line in lines]
    assert len(one) == len(eight) == 2
    assert max(abs(a - b) for a, b in zip(one, eight, strict=True)) <= 1e-5, (one, eight)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama2_7b_32k", "llama2_7b_100k", "llama2_70b_32k"])
def test_moonshot_compiles_and_fits(name, tmp_path):
    """LongLoRA steps of LLaMA-2-7B @ 32k and 100k on v4-8 and 70B @ 32k on v4-16 fit."""
    out = tmp_path / "report.json"
    proc = _aot("--config", os.path.join(REPO_ROOT, "configs", f"{name}.py"), "--topology",
                PAPER[name][0], "--json", str(out), timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["fits"] and report["per_chip_bytes"] <= report["usable_hbm_bytes"]
    assert report["kernels"]["splash"] > 0 and report["kernels"]["xla_softmax"] == 0


@pytest.mark.slow
def test_qlora_70b_fits_a_v4_8(tmp_path):
    """LLaMA-2-70B @ 32k with an NF4 frozen base fits 4 v4 chips (bf16: 8); the frozen
    weights per chip are 4-bit codes (packed) and bf16 scales: ~1/4 of bf16."""
    out = tmp_path / "report.json"
    proc = _aot("--config", os.path.join(REPO_ROOT, "configs", "llama2_70b_32k_qlora.py"),
                "--json", str(out), timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["topology"] == "v4-8" and report["quantize"] == "nf4"
    assert report["fits"] and report["per_chip_bytes"] <= report["usable_hbm_bytes"]
    assert report["kernels"]["splash"] > 0 and report["kernels"]["xla_softmax"] == 0
    bf16_frozen = 2 * report["params"] / report["chips"]
    assert report["arguments_bytes"]["frozen_weights"] < 0.3 * bf16_frozen


@pytest.mark.slow
def test_qlora_7b_100k_fits_one_v5p_chip(tmp_path):
    """LLaMA-2-7B @ 100k tokens, LoRA+, NF4 base on one v5p chip (the paper: 8 A100s): the
    config carries its topology, so the command needs nothing else."""
    out = tmp_path / "report.json"
    proc = _aot("--config", os.path.join(REPO_ROOT, "configs", "llama2_7b_100k_one_chip.py"),
                "--json", str(out), timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fits" in proc.stdout
    report = json.loads(out.read_text())
    assert (report["topology"], report["chips"], report["seq_len"]) == ("v5p:1x1x1", 1, 100_000)
    assert report["quantize"] == "nf4" and report["params"] > 6.5e9
    assert report["fits"] and report["per_chip_bytes"] <= report["usable_hbm_bytes"]
    assert report["kernels"]["splash"] > 0 and report["kernels"]["xla_softmax"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mistral_7b_32k", "qwen25_7b_32k", "pythia_6_9b_16k"])
def test_other_families_compile_and_fit(name, tmp_path):
    """Mistral-7B @ 32k (sliding window in the splash masks), Qwen2.5-7B @ 32k and
    Pythia-6.9B @ 16k: the LongLoRA step fits v4-8, attention all splash kernels."""
    out = tmp_path / "report.json"
    proc = _aot("--config", os.path.join(REPO_ROOT, "configs", f"{name}.py"), "--topology",
                PAPER[name][0], "--json", str(out), timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["fits"] and report["per_chip_bytes"] <= report["usable_hbm_bytes"]
    assert report["kernels"]["splash"] > 0 and report["kernels"]["xla_softmax"] == 0


@pytest.mark.integration
def test_mesh_over_irregular_tpu_devices_warns_and_uses_id_order():
    """Three chips of a v4-16 are no sub-cube: topology-aware placement fails, the mesh is
    still built (in id order) and a warning says so."""
    out = run_python("""
    import warnings
    from longlora_jax.parallel.mesh import make_mesh
    from longlora_jax.parallel.topology import parse_topology, topology_devices
    devices = topology_devices(parse_topology("v4-16"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mesh = make_mesh({"data": 3}, devices=devices[1:4])
    print([d.id for d in mesh.devices.flat], [str(w.message) for w in caught])
    """)
    assert "[1, 2, 3]" in out and "devices placed in id order" in out
