"""HF checkpoint I/O: the name table, sharded/bf16 checkpoints, bad input, atomic writes,
and loading straight into (and saving from) a sharded mesh."""

import json
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from longlora_jax import ConfigError, LlamaConfig, LlamaForCausalLM
from longlora_jax.errors import CheckpointError
from longlora_jax.io import hf
from longlora_jax.io.hf import load_pretrained, save_pretrained
from tests.helpers import run_python
from tests.test_model_vs_hf import hf_logits, our_logits, random_hf_model, tokens

GQA = {"num_key_value_heads": 2}


@pytest.fixture(scope="module")
def hf_model():
    return random_hf_model(GQA, "none")


@pytest.fixture
def ckpt(hf_model, tmp_path):
    """A single-file HF checkpoint dir of the tiny GQA model."""
    hf_model.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    return tmp_path / "ckpt"


def flat(params) -> dict:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


# ------------------------------------------------------------------------------ name table


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_name_table_round_trips(scan, tied):
    cfg = LlamaConfig.preset("tiny", scan_layers=scan, tie_word_embeddings=tied)
    names = hf.tensor_names(cfg)
    assert len(names) == 2 + 9 * cfg.num_hidden_layers + (not tied)
    assert {n.path for n in names} == set(hf.param_shapes(cfg))
    for name in names:
        assert hf.lookup_hf(name.hf, scan_layers=scan) == name
        assert hf.lookup_path(name.path, name.layer) == name
    q1 = hf.lookup_hf("model.layers.1.self_attn.q_proj.weight", scan_layers=scan)
    assert q1.transpose and q1.path[1:] == ("self_attn", "q_proj", "kernel")
    assert q1.path[0] == ("layers" if scan else "layers_1")
    assert q1.layer == (1 if scan else None)


def test_name_table_rejects_unknown_names():
    with pytest.raises(CheckpointError, match=r"model.layers.0.self_attn.q_proj.bias"):
        hf.lookup_hf("model.layers.0.self_attn.q_proj.bias")
    with pytest.raises(CheckpointError, match="give `layer`"):
        hf.lookup_path(("layers", "mlp", "up_proj", "kernel"))
    with pytest.raises(CheckpointError, match="layers_0/mlp/up_proj/a"):
        hf.lookup_path(("layers_0", "mlp", "up_proj", "a"))


# ------------------------------------------------------------------------------ loading


def test_sharded_index_loads_like_single_file(hf_model, ckpt, tmp_path):
    hf_model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "sharded" / hf.SAFE_INDEX).is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    _, single = load_pretrained(ckpt)
    _, sharded = load_pretrained(tmp_path / "sharded")
    a, b = flat(single), flat(sharded)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_bf16_checkpoint_keeps_or_converts_dtype(hf_model, tmp_path):
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    hf_model.to(torch.float32)
    exact = hf_model.model.layers[1].self_attn.k_proj.weight.detach().to(torch.bfloat16).float()
    cfg, params = load_pretrained(tmp_path)
    assert cfg.param_dtype == "bfloat16"
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
    cfg32, params32 = load_pretrained(tmp_path, dtype="float32")
    assert cfg32.param_dtype == "float32"
    kernel = np.asarray(params32["layers_1"]["self_attn"]["k_proj"]["kernel"])
    assert kernel.dtype == np.float32
    np.testing.assert_array_equal(kernel, exact.numpy().T)
    _, scanned = load_pretrained(tmp_path, config_overrides={"scan_layers": True,
                                                             "param_dtype": "float32"})
    np.testing.assert_array_equal(np.asarray(scanned["layers"]["self_attn"]["k_proj"]["kernel"][1]),
                                  kernel)


def _rewrite_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _rewrite_tensors(path, edit):
    tensors = load_file(path / hf.SAFE_SINGLE)
    edit(tensors)
    save_file(tensors, path / hf.SAFE_SINGLE, metadata={"format": "pt"})


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_error_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as e:
        load_pretrained(tmp_path / "nope")
    _one_line(e)


def test_error_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config.json") as e:
        load_pretrained(ckpt)
    _one_line(e)


def test_error_unknown_rope_type(ckpt):
    _rewrite_config(ckpt, rope_parameters={"rope_type": "wobbly", "rope_theta": 1e4})
    with pytest.raises(ConfigError, match="unknown rope scaling type 'wobbly'") as e:
        load_pretrained(ckpt)
    assert "linear" in _one_line(e)  # names what would be valid


def test_error_missing_tensor(ckpt):
    _rewrite_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor model.layers.1.mlp.up_proj.weight"
                       r" \(expected shape \[128, 64\]\)") as e:
        load_pretrained(ckpt)
    _one_line(e)


def test_error_missing_untied_head_says_so(ckpt):
    _rewrite_tensors(ckpt, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"lm_head.weight.*tie_word_embeddings is false"):
        load_pretrained(ckpt)


def test_error_misshaped_tensor(ckpt):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)

    _rewrite_tensors(ckpt, edit)
    with pytest.raises(CheckpointError, match=r"model.layers.0.self_attn.k_proj.weight has shape "
                       r"\[16, 64\], expected \[32, 64\]") as e:
        load_pretrained(ckpt)
    _one_line(e)


def test_error_vocab_embedding_mismatch(ckpt):
    _rewrite_config(ckpt, vocab_size=300)
    with pytest.raises(CheckpointError, match=r"vocab_size=300 .* 256 rows") as e:
        load_pretrained(ckpt)
    _one_line(e)


def test_error_pickle_only_checkpoint(ckpt):
    (ckpt / hf.SAFE_SINGLE).unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(CheckpointError, match=r"pickle .*pytorch_model.bin.*"
                       r"safe_serialization=True") as e:
        load_pretrained(ckpt)
    _one_line(e)
    (ckpt / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match=r"no model.safetensors"):
        load_pretrained(ckpt)


def test_error_index_names_missing_shard(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-.*missing"):
        load_pretrained(tmp_path)


# ------------------------------------------------------------------------------ saving


def test_save_from_boxed_init_loads_in_transformers(tmp_path):
    """Our own random init (flax-boxed, scanned) -> HF checkpoint -> same logits in torch."""
    cfg = LlamaConfig.preset("tiny", scan_layers=True, vocab_size=256)
    ids = tokens()
    boxed = LlamaForCausalLM(cfg).init(jax.random.key(0), ids)["params"]
    save_pretrained(cfg, boxed, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", hf.SAFE_SINGLE]
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ours = our_logits(cfg, jax.tree.map(jnp.asarray, boxed), ids)
    assert np.abs(hf_logits(model, ids) - ours).max() < 1e-5


def test_save_casts_dtype_and_records_it(ckpt, tmp_path):
    cfg, params = load_pretrained(ckpt)
    save_pretrained(cfg, params, tmp_path / "bf16", dtype=ml_dtypes.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(tmp_path / "bf16" / hf.SAFE_SINGLE, framework="numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    cfg16, _ = load_pretrained(tmp_path / "bf16")
    assert cfg16.param_dtype == "bfloat16"


def test_save_rejects_params_that_do_not_fit_the_config(ckpt, tmp_path):
    cfg, params = load_pretrained(ckpt)
    with pytest.raises(CheckpointError, match=r"scan_layers=True.*missing.*layers/"):
        save_pretrained(cfg.replace(scan_layers=True), params, tmp_path / "x")
    with pytest.raises(CheckpointError, match=re.escape("not {'params'")):
        save_pretrained(cfg, {"params": params}, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_save_replaces_old_checkpoint_and_keeps_other_files(ckpt, tmp_path):
    cfg, params = load_pretrained(ckpt)
    out = tmp_path / "out"
    save_pretrained(cfg, params, out, max_shard_bytes=32 * 1024)
    assert (out / hf.SAFE_INDEX).is_file()
    (out / "tokenizer.json").write_text("{}")
    save_pretrained(cfg, params, out)  # now one file: the old shards and index must go
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", hf.SAFE_SINGLE, "tokenizer.json"]
    _, again = load_pretrained(out)
    for key, value in flat(params).items():
        np.testing.assert_array_equal(flat(again)[key], value)


def test_crash_while_saving_leaves_no_complete_looking_checkpoint(ckpt, tmp_path, monkeypatch):
    cfg, params = load_pretrained(ckpt)
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:
            raise OSError("disk full")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(hf, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(cfg, params, tmp_path / "new", max_shard_bytes=32 * 1024)
    assert list(tmp_path.iterdir()) == [ckpt]  # neither the checkpoint nor a temp dir

    monkeypatch.setattr(hf, "save_file", save_file)
    save_pretrained(cfg, params, tmp_path / "old")
    before = (tmp_path / "old" / hf.SAFE_SINGLE).read_bytes()
    calls.clear()
    monkeypatch.setattr(hf, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(cfg, params, tmp_path / "old", max_shard_bytes=32 * 1024)
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["config.json", hf.SAFE_SINGLE]
    assert (tmp_path / "old" / hf.SAFE_SINGLE).read_bytes() == before


# ------------------------------------------------------------------------------ sharded


def test_load_into_mesh_shardings_and_save_back(ckpt, tmp_path):
    """8 fake devices, fsdp=4 x tensor=2: every leaf lands with its logical sharding, equal to
    the host load; logits match; saving the sharded params reproduces the checkpoint."""
    code = f"""
    import jax, jax.numpy as jnp, numpy as np
    from flax import traverse_util
    from safetensors.numpy import load_file
    from longlora_jax import LlamaForCausalLM
    from longlora_jax.io.hf import load_pretrained, save_pretrained
    from longlora_jax.parallel.mesh import make_mesh
    from longlora_jax.parallel.rules import tree_shardings

    jax.config.update("jax_default_matmul_precision", "highest")
    ckpt, out = {str(ckpt)!r}, {str(tmp_path / "resaved")!r}
    cfg, host = load_pretrained(ckpt, config_overrides={{"scan_layers": True}})
    mesh = make_mesh({{"fsdp": 4, "tensor": 2}})
    ids = jnp.zeros((2, 16), jnp.int32)
    abstract = jax.eval_shape(LlamaForCausalLM(cfg).init, jax.random.key(0), ids)["params"]
    shardings = tree_shardings(mesh, abstract)
    cfg2, sharded = load_pretrained(ckpt, shardings=shardings,
                                    config_overrides={{"scan_layers": True}})
    flat_s = traverse_util.flatten_dict(sharded)
    flat_h = traverse_util.flatten_dict(host)
    flat_want = traverse_util.flatten_dict(shardings)
    split = 0
    for key, leaf in flat_s.items():
        assert leaf.sharding.is_equivalent_to(flat_want[key], leaf.ndim), key
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat_h[key]))
        split += leaf.addressable_shards[0].data.size < leaf.size
    assert split >= 9, split  # the kernels and the embedding really are split
    model = LlamaForCausalLM(cfg)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 32)), jnp.int32)
    a = model.apply({{"params": host}}, ids)
    b = jax.jit(model.apply)({{"params": sharded}}, ids)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() < 1e-5
    save_pretrained(cfg2, sharded, out)
    src, dst = load_file(ckpt + "/model.safetensors"), load_file(out + "/model.safetensors")
    assert src.keys() == dst.keys()
    for name in src:
        np.testing.assert_array_equal(src[name], dst[name])
    print("ok", split)
    """
    assert run_python(code, devices=8).startswith("ok")
