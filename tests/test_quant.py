"""A quantized frozen base (QLoRA): the codes and scales, the model on them, loading, training
on a mesh, export, and bad settings.

References: the error bound of round-to-nearest (half a quantization step), the same model
on explicitly dequantized float kernels, loading in float and then quantizing, the float
model itself (transformers), one device vs eight fake ones, transformers loading the merged
export and PEFT loading the adapter.
"""

import json

import flax.linen as nn
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import traverse_util
from gguf.quants import dequantize

from longlora_jax import LlamaConfig, LlamaForCausalLM
from longlora_jax import evaluate as evaluate_command
from longlora_jax import export as export_command
from longlora_jax.cli import run_command
from longlora_jax.data import assets
from longlora_jax.errors import ConfigError
from longlora_jax.inference.decode import generate
from longlora_jax.io import export
from longlora_jax.io.base import abstract_variables
from longlora_jax.io.gguf import load_gguf
from longlora_jax.io.hf import load_pretrained
from longlora_jax.io.run import load_model, load_run
from longlora_jax.modeling import quant
from longlora_jax.training.config import model_config
from tests.helpers import REPO_ROOT, losses_on_one_and_eight_devices, run_python, train_config
from tests.test_gguf import write_gguf
from tests.test_model_vs_hf import hf_logits, random_hf_model, tokens

SCHEMES = quant.SCHEMES[1:]
ROUND_TO_NEAREST = ("int8", "int4", "nf4")  # each with an elementwise bound
TINY = f"{REPO_ROOT}/configs/tiny_cpu.py"
FAST = ["--config.seq_len=128", "--config.batch.global_batch=4", "--config.eval.before=False",
        "--config.eval.after=False", "--config.checkpoint.async_save=False",
        "--config.data.prefetch=0"]


def _weights(seed: int = 0) -> np.ndarray:
    """[2, 128, 96] kernels: rows of different magnitude, a few outliers, a zero column."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((2, 128, 96)).astype(np.float32)
    w *= rng.uniform(0.01, 1.0, (1, 128, 1)).astype(np.float32)
    w[0, 5, 7] = 12.0
    w[1, 100, 3] = -9.0
    w[:, :, 11] = 0.0
    return w


def _step(scales: np.ndarray, scheme: str, shape) -> np.ndarray:
    """The quantization step of every kernel element (its scale), [.., in, out]."""
    s = np.asarray(scales, np.float32)
    s = s[..., None, :] if scheme == "int8" else np.repeat(s, quant.GROUP, axis=-2)
    return np.broadcast_to(s, shape)


# ------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("scheme", ROUND_TO_NEAREST)
def test_round_trip_error_bounds(scheme, scale_dtype):
    w = _weights()
    stored = quant.quantize(w, scheme, scale_dtype)
    codes, scales = stored["kernel"], stored["scale"]
    assert codes.dtype == quant.code_dtype(scheme) and codes.shape == w.shape
    assert scales.dtype == jnp.dtype(scale_dtype)
    assert scales.shape == ((2, 96) if scheme == "int8" else (2, 128 // quant.GROUP, 96))
    back = np.asarray(quant.dequantize(stored, scheme, jnp.float32))
    err = np.abs(back - w)
    step = _step(scales, scheme, w.shape)
    if scheme == "nf4":  # half the widest gap between neighbouring levels
        bound = step * np.max(np.diff(quant.NF4)) / 2
    else:
        levels = {"int8": 127, "int4": 7}[scheme]
        assert np.abs(codes.astype(np.int8)).max() == levels  # the largest value hits the top
        bound = step / 2
    assert np.all(err <= bound * (1 + 1e-6)), float(np.max(err - bound))
    assert np.all(back[:, :, 11] == 0)
    rel = np.linalg.norm(back - w) / np.linalg.norm(w)
    assert rel < {"int8": 0.01, "int4": 0.2, "nf4": 0.2}[scheme], rel
    # jax.numpy on a device (a random-init base) quantizes alike: the same scales, and codes
    # that differ only where w / S is a tie (x.5) that XLA's fused division misses by an ulp
    stored_j = jax.jit(lambda x: quant.quantize(x, scheme, scale_dtype, jnp))(w)
    np.testing.assert_array_equal(np.asarray(stored_j["scale"]), scales)
    differ = np.asarray(stored_j["kernel"]).astype(np.int8) != codes.astype(np.int8)
    assert differ.mean() < 1e-3
    back_j = quant.dequantize(stored_j, scheme, jnp.float32)
    assert np.all(np.abs(np.asarray(back_j) - w) <= bound * (1 + 1e-5))


def _relative_errors(w, schemes) -> dict[str, tuple[float, float]]:
    """(||W - W'|| / ||W||, mean |W - W'| / mean |W|) per scheme, W' = its round trip (fp32
    parameters); "rtn4" is hqq4 with no solver iteration: round-to-nearest with the same
    storage (the range's ends on codes -8 and 7), where the solver starts."""
    errors = {}
    for scheme in schemes:
        iters = {"rtn4": 0}.get(scheme, quant.HQQ_ITERS)
        name = "hqq4" if scheme == "rtn4" else scheme
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(quant, "HQQ_ITERS", iters)
            back = np.asarray(quant.dequantize(quant.quantize(w, name, np.float32), name,
                                               jnp.float32))
        errors[scheme] = (float(np.linalg.norm(back - w) / np.linalg.norm(w)),
                          float(np.abs(back - w).mean() / np.abs(w).mean()))
    return errors


@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
def test_hqq4_round_trip_beats_round_to_nearest_on_random_weights(scale_dtype):
    """hqq4: 4-bit codes in -8..7, a scale and a zero point per group in the base's dtype;
    its solver lowers the error of round-to-nearest with the same storage (and int4's, by
    far); a zero column comes back exact, and jax.numpy quantizes as numpy does. (On these
    normal weights NF4, whose levels are a normal distribution's quantiles, is as close.)"""
    w = _weights()
    stored = quant.quantize(w, "hqq4", scale_dtype)
    assert sorted(stored) == ["kernel", "scale", "zero"]
    assert stored["kernel"].dtype == jnp.int4 and stored["kernel"].shape == w.shape
    assert stored["scale"].shape == stored["zero"].shape == (2, 128 // quant.GROUP, 96)
    assert stored["scale"].dtype == stored["zero"].dtype == jnp.dtype(scale_dtype)
    back = np.asarray(quant.dequantize(stored, "hqq4", jnp.float32))
    assert np.all(back[:, :, 11] == 0)
    # the codes are the nearest to the parameters as stored: error within half a step
    # wherever no value was clipped
    scale = _step(stored["scale"], "int4", w.shape)
    codes = np.asarray(stored["kernel"]).astype(np.int8)
    inside = (codes > -8) & (codes < 7)
    assert np.all(np.abs(back - w)[inside] <= scale[inside] / 2 * (1 + 1e-5))
    if scale_dtype == "float32":
        errors = _relative_errors(w, ("int4", "rtn4", "hqq4"))
        for norm in (0, 1):
            assert errors["hqq4"][norm] < 0.98 * errors["rtn4"][norm], errors
            assert errors["hqq4"][norm] < 0.8 * errors["int4"][norm], errors
    stored_j = jax.jit(lambda x: quant.quantize(x, "hqq4", scale_dtype, jnp))(w)
    back_j = np.asarray(quant.dequantize(stored_j, "hqq4", jnp.float32))
    np.testing.assert_allclose(np.linalg.norm(back_j - w), np.linalg.norm(back - w), rtol=1e-3)


def _smollm2_kernels(names) -> list[np.ndarray]:
    """Real kernels [in, out] (fp32) of the offline SmolLM2 GGUF (Q4_1 blocks, dequantized)."""
    reader = gguf.GGUFReader(assets.smollm2_gguf())
    tensors = {t.name: t for t in reader.tensors}
    return [dequantize(tensors[n].data, tensors[n].tensor_type).reshape(
        tuple(reversed(tensors[n].shape.tolist()))).T.astype(np.float32) for n in names]


def test_hqq4_beats_round_to_nearest_on_smollm2_and_matches_the_hqq_library():
    """On real weights (three SmolLM2 projections): hqq4's error is below round-to-nearest's
    with the same storage and nf4's, which is below int4's; the hqq library at its 4-bit
    defaults (the same solver, its zero point rounded to an integer) is within 1% of ours;
    and our nf4 is bitsandbytes' NF4."""
    import bitsandbytes.functional as bnb
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, Quantizer

    for w in _smollm2_kernels(["blk.3.attn_q.weight", "blk.15.ffn_down.weight",
                               "blk.27.attn_v.weight"]):
        errors = {k: v[0] for k, v in
                  _relative_errors(w, ("int4", "nf4", "rtn4", "hqq4")).items()}
        assert errors["hqq4"] < 0.95 * errors["rtn4"], errors
        assert errors["hqq4"] < 0.85 * errors["nf4"] < 0.85 * errors["int4"], errors
        w_t = torch.from_numpy(np.ascontiguousarray(w.T))
        settings = BaseQuantizeConfig(nbits=4, group_size=quant.GROUP)["weight_quant_params"]
        codes, meta = Quantizer.quantize(w_t, device="cpu", compute_dtype=torch.float32,
                                         **settings)
        theirs = Quantizer.dequantize(codes, meta).reshape(w_t.shape).numpy().T
        hqq_error = np.linalg.norm(theirs - w) / np.linalg.norm(w)
        assert errors["hqq4"] <= hqq_error * 1.01, (errors, hqq_error)
        codes, state = bnb.quantize_4bit(w_t, blocksize=quant.GROUP, quant_type="nf4")
        ours = quant.dequantize(quant.quantize(w, "nf4", np.float32), "nf4", jnp.float32)
        np.testing.assert_allclose(np.asarray(ours), bnb.dequantize_4bit(codes, state).numpy().T,
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("scheme", ["int4+dq", "nf4+dq", "hqq4+dq"])
def test_double_quantized_parameters_are_within_half_their_step(scheme):
    """Scales (and zero points) as uint8 codes with an fp32 minimum and step per 256 output
    columns of a group row (300 columns: a full block and a ragged one): each dequantizes
    within half its block's step of the parameter it replaced, and the kernel stays as close
    to the weights as without double quantization."""
    w = _weights()
    w = np.concatenate([w, 3 * w, w / 2, w[:, :, :12]], axis=-1)  # 300 columns
    plain = quant.quantize(w, quant.base_scheme(scheme), np.float32)
    stored = quant.quantize(w, scheme, np.float32)
    for name in [k for k in plain if k != "kernel"]:
        assert stored[name].dtype == np.uint8
        assert stored[f"{name}_dq"].shape == (2, 128 // quant.GROUP, 2, 2)
        back = np.asarray(quant._dequantize_param(stored, name))
        bound = np.asarray(quant.dequantized_param_bound(stored, name))
        assert np.all(np.abs(back - plain[name]) <= bound * (1 + 1e-5) + 1e-7)
        # the step is a 255th of the block's range
        block = plain[name][..., :256]
        np.testing.assert_allclose(bound[..., 0], (block.max(-1) - block.min(-1)) / 510,
                                   rtol=1e-6)
    errors = _relative_errors(w, (quant.base_scheme(scheme), scheme))
    assert errors[scheme][0] < errors[quant.base_scheme(scheme)][0] * 1.01, errors
    stored_j = jax.jit(lambda x: quant.quantize(x, scheme, jnp.float32, jnp))(w)
    for name, value in stored.items():  # hqq4: XLA's sums round differently
        if value.dtype == np.float32:  # the statistics
            np.testing.assert_allclose(np.asarray(stored_j[name]), value, rtol=1e-4, atol=1e-6)
        else:
            same = np.asarray(stored_j[name]).astype(np.int32) == value.astype(np.int32)
            assert same.mean() > 0.99, name


def test_int4_codes_are_stored_packed():
    """Two int4 codes per byte in a compiled program's arguments: a quarter of bf16."""
    codes = jax.ShapeDtypeStruct((1024, 1024), jnp.int4)
    bf16 = jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16)
    sizes = [jax.jit(lambda x: x.astype(jnp.float32).sum()).lower(x).compile()
             .memory_analysis().argument_size_in_bytes for x in (codes, bf16)]
    assert sizes == [512 * 1024, 2 * 1024 * 1024]


def _tiny(scheme: str, **changes) -> LlamaConfig:
    return LlamaConfig.preset("tiny", scan_layers=True, lora_rank=4, quantize=scheme,
                              lora_targets=("q_proj", "v_proj", "down_proj"), **changes)


def _random_lora(cfg: LlamaConfig) -> dict:
    """LoRA factors with B nonzero, so the adapters change the output."""
    lora = LlamaForCausalLM(cfg).init(jax.random.key(3), tokens(1, 8))["lora"]
    keys = iter(jax.random.split(jax.random.key(4), 64))
    return jax.tree.map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape), nn.unbox(lora))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_model_is_the_float_model_on_dequantized_kernels(scheme, tied):
    """Every projection quantized, dequantized inside its matmul, LoRA on top; embeddings,
    norms and the LM head left alone. Same logits and LoRA gradients as the float model on
    the dequantized kernels."""
    qcfg = _tiny(scheme, tie_word_embeddings=tied)
    fcfg = qcfg.replace(quantize="none")
    float_params = nn.unbox(LlamaForCausalLM(fcfg).init(jax.random.key(0), tokens(1, 8)))
    float_params = float_params["params"]
    modules = quant.quantized_modules(nn.unbox(abstract_variables(LlamaForCausalLM(qcfg)))
                                      ["params"])
    assert len(modules) == 7 and all(m[0] == "layers" for m in modules)  # not the LM head
    qparams = quant.quantize_tree(float_params, scheme, modules)
    flat = traverse_util.flatten_dict(qparams)
    assert flat[("layers", "mlp", "up_proj", "kernel")].dtype == quant.code_dtype(scheme)
    assert flat[("embed_tokens", "embedding")].dtype == jnp.float32
    assert tied or flat[("lm_head", "kernel")].dtype == jnp.float32
    dparams = quant.dequantize_tree(qparams, scheme)
    assert set(traverse_util.flatten_dict(dparams)) == set(traverse_util.flatten_dict(
        float_params))
    lora, ids = _random_lora(qcfg), tokens(2, 16)

    def loss(lora_tree, cfg, params):
        logits = LlamaForCausalLM(cfg).apply({"params": params, "lora": lora_tree}, ids)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    (_, q_logits), q_grads = jax.value_and_grad(loss, has_aux=True)(lora, qcfg, qparams)
    (_, d_logits), d_grads = jax.value_and_grad(loss, has_aux=True)(lora, fcfg, dparams)
    np.testing.assert_allclose(q_logits, d_logits, atol=1e-5, rtol=0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
                 q_grads, d_grads)
    f_logits = LlamaForCausalLM(fcfg).apply({"params": float_params, "lora": lora}, ids)
    assert np.abs(q_logits - f_logits).max() > 0  # the kernels did change


def test_generate_on_a_quantized_base_is_decoding_the_dequantized_model():
    """Greedy KV-cache decoding (prefill in chunks) of a base loaded int4 by `load_model`
    (what `generate --config.quantize=int4` runs; a random-init base, quantized on its
    device) = decoding the float model on the dequantized kernels, whose kernels are the
    float base's within half a step."""
    loaded = load_model("preset:tiny", quantize="int4")
    assert loaded.cfg.quantize == "int4"
    params = loaded.variables["params"]
    prompt = tokens(2, 12)
    kwargs = {"temperature": 0.0, "prefill_chunk": 8}
    ours = generate(loaded.cfg, params, prompt, 10, **kwargs)
    dequantized = quant.dequantize_tree(params, "int4")
    want = generate(loaded.cfg.replace(quantize="none"), dequantized, prompt, 10, **kwargs)
    np.testing.assert_array_equal(ours, want)
    up = params["layers"]["mlp"]["up_proj"]
    error = np.abs(np.asarray(dequantized["layers"]["mlp"]["up_proj"]["kernel"]) - np.asarray(
        load_model("preset:tiny").variables["params"]["layers"]["mlp"]["up_proj"]["kernel"]))
    step = _step(up["scale"], "int4", error.shape)
    assert error.max() > 0 and np.all(error <= step / 2 * (1 + 1e-5))


# ------------------------------------------------------------------------------ loading

# The tiny checkpoint: in dims 64 (hidden) and 128 (MLP), so int4 groups fit.
GQA = {"num_key_value_heads": 2}


@pytest.fixture(scope="module")
def hf_model():
    return random_hf_model(GQA, "none")


@pytest.fixture(scope="module")
def ckpt(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "hf"
    hf_model.save_pretrained(path, safe_serialization=True)
    return path


def _assert_loaded_like_quantized_after(cfg, loaded, float_params):
    """`loaded` (quantized while reading) equals `float_params` quantized afterwards, layer
    by layer as the loader does (hqq4's sums may round differently over a stacked array)."""
    modules = quant.quantized_modules(loaded)
    assert len(modules) == 7
    want = dict(traverse_util.flatten_dict(float_params))
    for module in modules:
        kernels = np.asarray(want.pop((*module, "kernel")))  # [layers, in, out]
        layers = [quant.quantize(k, cfg.quantize, kernels.dtype) for k in kernels]
        for name in layers[0]:
            want[(*module, name)] = np.stack([layer[name] for layer in layers])
    got = traverse_util.flatten_dict(loaded)
    assert set(got) == set(want)
    for path, value in want.items():
        assert got[path].dtype == value.dtype, path
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(value), err_msg=path)


def _relative_error(cfg, params, reference, ids) -> float:
    """max |logit - reference| / max |reference| of the model on `params` (fp32 compute)."""
    logits = LlamaForCausalLM(cfg.replace(dtype="float32")).apply({"params": params}, ids)
    return float(np.abs(np.asarray(logits) - reference).max() / np.abs(reference).max())


def test_hf_checkpoint_loads_quantized(hf_model, ckpt):
    """Quantized as it loads == loaded in bf16 then quantized; the fewer the bits, the
    farther from the float model (transformers): bf16 < int8 < int4, nf4. (This random tiny model,
    weights ~ 1/sqrt(in), amplifies weight noise; the README's SmolLM2 perplexities measure
    real quality.)"""
    arch = {"scan_layers": True}
    cfg, bf16 = load_pretrained(ckpt, dtype="bfloat16", config_overrides=arch)
    ids = tokens()
    reference = hf_logits(hf_model, ids)
    errors = [_relative_error(cfg, bf16, reference, ids)]
    for scheme in SCHEMES:
        cfg, params = load_pretrained(ckpt, dtype="bfloat16",
                                      config_overrides={**arch, "quantize": scheme})
        assert cfg.quantize == scheme
        _assert_loaded_like_quantized_after(cfg, params, bf16)
        errors.append(_relative_error(cfg, params, reference, ids))
    assert errors[0] < errors[1] < min(errors[2:]), errors
    assert errors[1] < 0.06 and max(errors[2:]) < 0.8, errors


def test_skipped_projections_load_in_float_and_the_rest_quantized(hf_model, ckpt):
    """`quantize_skip`: down_proj keeps its bf16 kernel as read, the other six projections
    are quantized (through the base loader `train` uses); the model sits between the float
    one and the fully quantized one (transformers as the reference)."""
    from longlora_jax.io import base
    from longlora_jax.parallel.mesh import make_mesh

    arch = {"scan_layers": True}
    cfg, bf16 = load_pretrained(ckpt, dtype="bfloat16", config_overrides=arch)
    cfg = cfg.replace(quantize="nf4", quantize_skip=("down_proj",))
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    params = base.load_base_params(  # as `train` loads its base
        base.BaseSpec.parse(f"hf:{ckpt}"), cfg, seed=0, dtype="bfloat16",
        shardings=base.variable_shardings(LlamaForCausalLM(cfg), mesh)["params"])
    modules = quant.quantized_modules(params)
    assert len(modules) == 6 and ("layers", "mlp", "down_proj") not in modules
    flat, want = traverse_util.flatten_dict(params), traverse_util.flatten_dict(bf16)
    down = ("layers", "mlp", "down_proj", "kernel")
    np.testing.assert_array_equal(np.asarray(flat[down]), np.asarray(want[down]))
    _, full = load_pretrained(ckpt, dtype="bfloat16", config_overrides={**arch, "quantize": "nf4"})
    ids = tokens()
    reference = hf_logits(hf_model, ids)
    errors = [_relative_error(c, p, reference, ids) for c, p in (
        (cfg.replace(quantize="none", quantize_skip=()), bf16), (cfg, params),
        (cfg.replace(quantize_skip=()), full))]
    assert errors[0] < errors[1] < errors[2], errors


def test_gguf_loads_quantized(hf_model, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(hf_model, path, quantize=False)
    cfg, params = load_gguf(path, config_overrides={"scan_layers": True, "quantize": "int4"})
    _, fp32 = load_gguf(path, config_overrides={"scan_layers": True})
    _assert_loaded_like_quantized_after(cfg, params, fp32)
    ids = tokens()
    reference = hf_logits(hf_model, ids)
    assert 0 < _relative_error(cfg, params, reference, ids) < 0.8


def test_quantized_loading_shards_codes_and_scales_like_their_weights(ckpt):
    """On a data 1 x fsdp 2 x sequence 2 x tensor 2 mesh: codes split like the kernels,
    int8 scales like the output axis, int4 scales (and hqq4's zero points) [in / 64, out]
    over both axes where the mesh divides the groups (else that axis whole); values equal
    one device's."""
    out = run_python(f"""
    import json
    import numpy as np
    from flax import traverse_util
    from longlora_jax.io.base import variable_shardings
    from longlora_jax.io.hf import load_pretrained
    from longlora_jax.modeling.config import LlamaConfig
    from longlora_jax.modeling.families import build_model
    from longlora_jax.parallel.mesh import make_mesh
    mesh = make_mesh({{"data": 1, "fsdp": 2, "sequence": 2, "tensor": 2}})
    specs = {{}}
    for scheme in ("int8", "int4", "hqq4+dq"):
        arch = {{"scan_layers": True, "quantize": scheme}}
        cfg = LlamaConfig.from_hf("{ckpt}", **arch)
        shardings = variable_shardings(build_model(cfg), mesh)["params"]
        _, sharded = load_pretrained("{ckpt}", config_overrides=arch, shardings=shardings)
        _, single = load_pretrained("{ckpt}", config_overrides=arch)
        flat, one = traverse_util.flatten_dict(sharded), traverse_util.flatten_dict(single)
        for path, x in flat.items():
            assert np.array_equal(np.asarray(x), np.asarray(one[path])), path
        for module in ("self_attn/q_proj", "self_attn/o_proj", "mlp/down_proj"):
            for leaf in ("kernel", "scale", "zero", "zero_dq"):
                if ("layers", *module.split("/"), leaf) not in flat:
                    continue
                x = flat[("layers", *module.split("/"), leaf)]
                specs[f"{{scheme}} {{module}} {{leaf}}"] = [
                    a if a is None or isinstance(a, str) else list(a) for a in x.sharding.spec]
    print(json.dumps(specs))
    """, devices=8)
    specs = json.loads(out.splitlines()[-1])
    embed = ["fsdp", "sequence"]
    assert specs["int8 self_attn/q_proj kernel"] == [None, embed, "tensor"]
    assert specs["int8 self_attn/q_proj scale"] == [None, "tensor"]
    assert specs["int8 self_attn/o_proj scale"] == [None, embed]
    assert specs["int4 self_attn/q_proj kernel"] == [None, embed, "tensor"]
    assert specs["int4 self_attn/q_proj scale"][1:] == [None, "tensor"]  # 1 group of 64
    assert specs["int4 mlp/down_proj kernel"] == [None, "tensor", embed]
    assert specs["int4 mlp/down_proj scale"] == [None, "tensor", embed]  # 128 / 64 = 2 groups
    # hqq4's zero points like its scales; double-quantization statistics [.., in / 64,
    # blocks of 256 columns, 2]: one block of 64 columns, so that axis whole
    assert specs["hqq4+dq mlp/down_proj zero"] == [None, "tensor", embed]
    assert specs["hqq4+dq mlp/down_proj zero_dq"] == [None, "tensor", None, None]


# ------------------------------------------------------------------------------ training


@pytest.mark.integration
def test_quantized_train_step_sharded_equals_unsharded():
    """Three steps of the tiny config with an int4 base: 8 fake devices (data 2 x fsdp 2 x
    sequence 2) give the losses of one device, and the losses fall."""
    one, eight = losses_on_one_and_eight_devices(*FAST, "--config.model.quantize=int4",
                                                 "--config.optim.lr=3e-3")
    assert len(one) == len(eight) == 3 and one[-1] < one[0]
    np.testing.assert_allclose(eight, one, atol=1e-5, rtol=0)


@pytest.mark.integration
def test_quantized_run_exports_and_evaluates(tmp_path):
    """An int8 run: the merged export is dequantized (fp32 here: the run's frozen dtype) and
    transformers' logits equal the run's; the PEFT adapter on the written base equals them
    too; evaluation loads the run quantized as it trained, or on the float base."""
    from longlora_jax.training.loop import train

    workdir = tmp_path / "run"
    train(train_config(TINY, *FAST, "--config.max_steps=2", "--config.checkpoint.every=2",
                       "--config.model.quantize=int8", "--config.model.frozen_dtype=float32"),
          workdir)
    for fmt in export.FORMATS:
        assert run_command(export_command.COMMAND, ["--workdir", str(workdir), "--out",
                                                    str(tmp_path / fmt), "--format", fmt]) == 0
    run = load_run(workdir)
    assert run.cfg.quantize == "int8"
    kernel = run.variables["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert kernel.dtype == jnp.int8
    hf_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert hf_config["torch_dtype"] == "float32" and "quantize" not in hf_config
    adapter = json.loads((tmp_path / "peft" / export.ADAPTER_CONFIG).read_text())
    ids = tokens() % run.cfg.vocab_size
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        merged = merged(torch.from_numpy(ids).long()).logits.numpy()
        base = transformers.AutoModelForCausalLM.from_pretrained(
            adapter["base_model_name_or_path"])
        via_peft = peft.PeftModel.from_pretrained(base, tmp_path / "peft")(
            torch.from_numpy(ids).long()).logits.numpy()
    ours = np.asarray(LlamaForCausalLM(run.cfg).apply(run.variables, ids))
    np.testing.assert_allclose(merged, ours, atol=1e-4)
    np.testing.assert_allclose(via_peft, ours, atol=1e-4)
    as_trained = load_model(str(workdir))
    assert as_trained.cfg.quantize == "int8"
    np.testing.assert_array_equal(
        as_trained.variables["params"]["layers"]["mlp"]["up_proj"]["kernel"],
        run.variables["params"]["layers"]["mlp"]["up_proj"]["kernel"])
    on_float = load_model(str(workdir), quantize="none")
    assert on_float.cfg.quantize == "none"
    assert on_float.variables["params"]["layers"]["mlp"]["up_proj"]["kernel"].dtype == (
        jnp.float32)


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("overrides, match", [
    (["--config.model.quantize=int3"], r"model.quantize='int3'; valid: none, int8, int4"),
    (["--config.model.quantize=int4", "--config.lora.mode=full"],
     r"model.quantize='int4' keeps the base frozen, but lora.mode='full' trains it"),
    (["--config.model.quantize=int4",
      "--config.model.overrides={'vocab_size': 512, 'intermediate_size': 96}"],
     r"quantize='int4' stores groups of 64 input rows, but down_proj has 96 inputs"),
    (["--config.model.quantize=nf4", "--config.model.quantize_skip=down"],
     r"quantize_skip module 'down' is not one of: q_proj, k_proj, v_proj, o_proj, gate_proj, "
     r"up_proj, down_proj"),
])
def test_bad_quantize_settings_are_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match) as info:
        model_config(train_config(TINY, *overrides))
    assert "\n" not in str(info.value)


def test_evaluate_refuses_unknown_quantize(capsys):
    code = run_command(evaluate_command.COMMAND, ["--model", "preset:tiny",
                                                  "--config.quantize=int5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: quantize='int5'; valid: auto, none, int8, int4, nf4, "
                                 "hqq4, int4+dq, nf4+dq, hqq4+dq"]

