"""The optimizer: state only for trainable leaves, HF/PyTorch-identical AdamW, schedules.

References: transformers' `get_*_schedule_with_warmup` for the learning rate, and
`torch.optim.AdamW` with two parameter groups plus `clip_grad_norm_` (what the HF Trainer of
the official LongLoRA runs does) for the updates.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from longlora_jax import LlamaConfig, LlamaForCausalLM
from longlora_jax.modeling import lora
from longlora_jax.training.optim import default_optim_config, lr_schedule, make_optimizer

IDS = np.zeros((1, 8), np.int32)


def abstract_variables(cfg: LlamaConfig) -> dict:
    """ShapeDtypeStructs of the model's variables (no memory, no compute)."""
    boxed = jax.eval_shape(LlamaForCausalLM(cfg).init, jax.random.key(0), IDS)
    return nn.unbox(boxed)


def nbytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def adam_moments(opt_state) -> dict[str, dict]:
    """{group: flat {path: mu leaf}} of the partitioned AdamW (MaskedNode leaves dropped)."""
    partition_state = opt_state[1]
    out = {}
    for group, inner in partition_state.inner_states.items():
        mu = inner.inner_state[0].mu
        flat = traverse_util.flatten_dict(mu)
        out[group] = {p: x for p, x in flat.items() if isinstance(x, jax.ShapeDtypeStruct)}
    return out


@pytest.mark.parametrize("mode", ["lora", "lora_plus"])
@pytest.mark.parametrize("scan", [False, True])
def test_optimizer_state_only_for_trainable_leaves(mode, scan):
    cfg = LlamaConfig.preset("tiny", lora_rank=4, scan_layers=scan, param_dtype="bfloat16")
    variables = abstract_variables(cfg)
    labels = lora.trainable_labels(variables, mode)
    trainable, frozen = lora.split_trainable(variables, labels)
    trainable = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), trainable
    )
    opt_state = jax.eval_shape(make_optimizer(default_optim_config(), trainable).init, trainable)

    n_trainable = len(jax.tree_util.tree_leaves(trainable))
    scalars = [x for x in jax.tree_util.tree_leaves(opt_state) if x.shape == ()]
    # mu and nu per trainable leaf; a step count per Adam and per schedule in each group.
    assert len(jax.tree_util.tree_leaves(opt_state)) == 2 * n_trainable + len(scalars)
    assert len(scalars) == 4
    assert nbytes(opt_state) == 2 * nbytes(trainable) + 4 * 4
    assert nbytes(frozen) > 0

    moments = adam_moments(opt_state)
    flat_trainable = traverse_util.flatten_dict(trainable)
    assert set(moments["decay"]) | set(moments["no_decay"]) == set(flat_trainable)
    assert not set(traverse_util.flatten_dict(frozen)) & set(flat_trainable)
    kinds = {g: {lora.param_kind(p) for p in m} for g, m in moments.items()}
    if mode == "lora":
        assert kinds == {"decay": {"lora"}, "no_decay": set()}
    else:
        assert kinds == {"decay": {"lora"}, "no_decay": {"embedding", "norm"}}
    assert all(x.dtype == jnp.float32 for m in moments.values() for x in m.values())


# ------------------------------------------------------------------------------ schedules

def hf_lrs(name: str, lr: float, warmup: int, total: int, steps: int) -> list[float]:
    torch = pytest.importorskip("torch")
    import transformers

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = transformers.get_scheduler(name, opt, num_warmup_steps=warmup,
                                       num_training_steps=total)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("schedule", ["constant_with_warmup", "cosine", "linear"])
def test_schedule_matches_hf(schedule):
    cfg = default_optim_config()
    cfg.update(dict(lr=3e-4, warmup_steps=5, total_steps=30, schedule=schedule))
    # Up to total_steps: past it HF's cosine climbs back up, ours stays at the floor.
    ours = [float(lr_schedule(cfg)(step)) for step in range(31)]
    np.testing.assert_allclose(ours, hf_lrs(schedule, 3e-4, 5, 30, 31), rtol=1e-5, atol=1e-12)


def test_min_lr_ratio_floors_decay():
    cfg = default_optim_config()
    cfg.update(dict(lr=1.0, warmup_steps=0, total_steps=10, schedule="cosine", min_lr_ratio=0.1))
    assert float(lr_schedule(cfg)(0)) == pytest.approx(1.0)
    assert float(lr_schedule(cfg)(10)) == pytest.approx(0.1)
    cfg.schedule = "linear"
    assert float(lr_schedule(cfg)(5)) == pytest.approx(0.55)
    assert float(lr_schedule(cfg)(50)) == pytest.approx(0.1)


# ------------------------------------------------------------------------------ updates

def test_updates_match_torch_adamw_with_clipping_and_decay_groups():
    torch = pytest.importorskip("torch")
    import transformers

    rng = np.random.default_rng(0)
    trainable = {
        "lora": {"layers_0": {"self_attn": {"q_proj": {"a": rng.standard_normal((6, 2)),
                                                       "b": rng.standard_normal((2, 6))}}}},
        "params": {"norm": {"weight": rng.standard_normal(6)},
                   "embed_tokens": {"embedding": rng.standard_normal((10, 6))}},
    }
    trainable = jax.tree_util.tree_map(lambda x: x.astype(np.float32), trainable)
    cfg = default_optim_config()
    cfg.update(dict(lr=1e-2, warmup_steps=2, weight_decay=0.1, clip_norm=0.5, b2=0.95))
    tx = make_optimizer(cfg, trainable)
    state = tx.init(trainable)

    flat = traverse_util.flatten_dict(trainable)
    torch_params = {p: torch.nn.Parameter(torch.tensor(np.array(x))) for p, x in flat.items()}
    decay = [t for p, t in torch_params.items() if lora.param_kind(p) == "lora"]
    no_decay = [t for p, t in torch_params.items() if lora.param_kind(p) != "lora"]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
    )
    sched = transformers.get_constant_schedule_with_warmup(opt, num_warmup_steps=2)
    params = trainable
    for _ in range(5):
        grads = jax.tree_util.tree_map(lambda x: rng.standard_normal(x.shape).astype(np.float32),
                                       params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        for p, g in traverse_util.flatten_dict(grads).items():
            torch_params[p].grad = torch.tensor(np.array(g))
        torch.nn.utils.clip_grad_norm_(list(torch_params.values()), 0.5)
        opt.step()
        sched.step()
    for p, x in traverse_util.flatten_dict(params).items():
        np.testing.assert_allclose(x, torch_params[p].detach().numpy(), rtol=1e-5, atol=1e-6)
    norm = params["params"]["norm"]["weight"]
    assert not np.allclose(norm, trainable["params"]["norm"]["weight"])


# ------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"schedule": "step"}, "optim.schedule='step'; valid: constant_with_warmup, cosine"),
        ({"schedule": "cosine", "total_steps": 20}, "needs total_steps > warmup_steps"),
        ({"warmup_steps": -1}, "warmup_steps must be >= 0, got -1"),
        ({"clip_norm": -1.0}, "clip_norm must be >= 0"),
    ],
)
def test_bad_optimizer_settings(changes, message):
    cfg = default_optim_config()
    cfg.update(changes)
    with pytest.raises(ValueError, match=message):
        make_optimizer(cfg, {"lora": {"a": np.zeros((2, 2), np.float32)}})


# ------------------------------------------------------------------------------ memory

GIB = 2.0**30


def compiled_step_memory(mode: str, devices, *, layers: int, frozen_dtype: str,
                         dtype: str = "bfloat16", seq_len: int = 512) -> dict[str, int]:
    """Memory of the real jitted train step (`train_step.build_train_setup`) for a 7B-shaped
    model (hidden 4096, 32 heads, MLP 11008, vocab 32000; `layers` scanned layers, full
    remat, compute in `dtype`), compiled on abstract inputs only: nothing is allocated.
    Trainable leaves fp32, frozen ones `frozen_dtype`; "full" is full fine-tuning (no LoRA).
    """
    from longlora_jax.parallel.mesh import make_mesh
    from longlora_jax.training.step import StepOptions, build_train_setup

    cfg = LlamaConfig.preset(
        "llama2-7b", num_hidden_layers=layers, scan_layers=True, remat_policy="full",
        dtype=dtype, lora_rank=0 if mode == "full" else 8,
    )
    setup = build_train_setup(
        LlamaForCausalLM(cfg), make_mesh(devices=devices), mode=mode,
        optim_cfg=default_optim_config(), options=StepOptions(loss_chunk=256),
        frozen_dtype=frozen_dtype,
    )
    analysis = setup.lower(1, seq_len).compile().memory_analysis()
    return {
        "argument": analysis.argument_size_in_bytes,
        "temp": analysis.temp_size_in_bytes,
        "trainable": nbytes(setup.abstract_state.trainable),
        "opt_state": nbytes(setup.abstract_state.opt_state),
        "frozen": nbytes(setup.abstract_frozen),
        "frozen_fp32": sum(x.size * 4 for x in jax.tree_util.tree_leaves(setup.abstract_frozen)),
    }


def check_memory(plus: dict[str, int], full: dict[str, int]) -> float:
    """Asserts what the frozen weights do not carry; returns (arg + temp) lora_plus / full."""
    for m in (plus, full):
        # Adam moments for exactly the trainable leaves (plus a few scalar step counts) ...
        assert 0 <= m["opt_state"] - 2 * m["trainable"] < 1024
        # ... and the arguments are state + frozen weights + a [1, N] batch, nothing else.
        assert 0 <= m["argument"] - (m["trainable"] + m["opt_state"] + m["frozen"]) < 2**20
    assert full["frozen"] == 0
    # Gradients of the frozen weights would take at least their fp32 bytes of temp space.
    assert plus["temp"] < plus["frozen_fp32"]
    for name, m in (("lora_plus", plus), ("full", full)):
        print(f"{name}: argument {m['argument']:,} B + temp {m['temp']:,} B = "
              f"{(m['argument'] + m['temp']) / GIB:.2f} GiB")
    ratio = (plus["argument"] + plus["temp"]) / (full["argument"] + full["temp"])
    print(f"lora_plus / full = {ratio:.3f}")
    return ratio


def test_frozen_weights_get_no_gradients_or_moments():
    """CPU, 2 layers, all fp32: XLA's CPU backend has no bf16 dot and upcasts whole bf16
    weight stacks to fp32 in temp space (TPUs and GPUs do not), so dtypes are not mixed here."""
    devices = jax.devices()[:1]
    plus, full = (compiled_step_memory(mode, devices, layers=2, frozen_dtype="float32",
                                       dtype="float32") for mode in ("lora_plus", "full"))
    assert check_memory(plus, full) < 0.5


@pytest.mark.slow
def test_lora_plus_step_memory_on_tpu_is_at_most_40_percent_of_full():
    """Issue 4's number: 4 layers, bf16 frozen / fp32 trainable, compiled ahead of time for
    one TPU v5p chip with libtpu (no TPU needed). Print with
    `pytest tests/test_optim.py -m slow -k memory -s` (about 5 min on 2 CPU cores)."""
    pytest.importorskip("libtpu")
    from tests.helpers import run_python

    out = run_python(
        """
        from jax.experimental import topologies
        from tests.test_optim import check_memory, compiled_step_memory
        devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices
        plus, full = (compiled_step_memory(m, devices[:1], layers=4, frozen_dtype="bfloat16")
                      for m in ("lora_plus", "full"))
        print(f"RATIO {check_memory(plus, full)}")
        """,
        env={"TPU_ACCELERATOR_TYPE": "v5p-8", "TPU_WORKER_HOSTNAMES": "localhost",
             "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"},
    )
    print(out)
    ratio = float(out.split("RATIO ")[1])
    assert ratio <= 0.40
