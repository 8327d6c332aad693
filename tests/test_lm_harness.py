"""lm-eval backend: `longlora_jax` against lm-eval's own `hf` backend on the same weights.

A tiny random LLaMA with a byte-level BPE tokenizer (an HF directory); three local tasks (no
download): multiple choice, rolling loglikelihood (documents longer than the 64-token window,
so several windows each) and greedy generate_until. Per-document loglikelihoods must agree
within 1e-3, accuracies exactly, generations token for token.
"""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import transformers

from longlora_jax.data import assets
from longlora_jax.errors import ConfigError
from tests.helpers import REPO_ROOT

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

from longlora_jax.evaluation.lm_harness import LongLoRALM  # noqa: E402

TASKS = ["tiny_mc", "tiny_rolling", "tiny_gen"]


def bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    text = " ".join(d.text for d in assets.essays()[:3])
    backend.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                                eos_token="</s>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_hf")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.ndim > 1 else 0.1) + (p.ndim == 1))
    model.save_pretrained(path, safe_serialization=True)
    bpe_tokenizer().save_pretrained(path)
    return path


def write_tasks(root) -> None:
    """Three lm-eval YAML tasks over local JSON files in `root`."""
    essays = [d.text for d in assets.essays()[3:6]]
    data = {
        "mc": [{"question": f"Question {i}: which word comes next in '{s[:40]}'?",
                "choices": [s[40:52], s[60:75], " the", " startup"], "answer": i % 4}
               for i, s in enumerate(essays + essays)],
        "rolling": [{"text": s[:600]} for s in essays],
        "gen": [{"prompt": s[:80], "answer": s[80:90]} for s in essays],
    }
    for name, rows in data.items():
        (root / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    common = "dataset_path: json\ntest_split: test\n"
    tasks = {
        "tiny_mc": """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
        "tiny_rolling": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""",
        "tiny_gen": """output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""",
    }
    for (task, body), data_name in zip(tasks.items(), ("mc", "rolling", "gen"), strict=True):
        files = f"dataset_kwargs:\n  data_files:\n    test: {root / data_name}.jsonl\n"
        (root / f"{task}.yaml").write_text(f"task: {task}\n{common}{files}{body}")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    write_tasks(root)
    return root


def per_document(results) -> dict[str, list]:
    """task -> the filtered responses of its documents, in document order."""
    out = {}
    for task, samples in results["samples"].items():
        rows = sorted(samples, key=lambda s: s["doc_id"])
        out[task] = [s["filtered_resps"] for s in rows]
    return out


def evaluate(lm, task_dir, batch_size: int):
    return lm_eval.simple_evaluate(model=lm, tasks=TASKS, batch_size=batch_size,
                                   task_manager=TaskManager(include_path=str(task_dir)),
                                   log_samples=True)


def test_longlora_jax_matches_lm_evals_hf_backend(model_dir, task_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval.models.huggingface import HFLM

    hf = evaluate(HFLM(pretrained=str(model_dir), dtype="float32", device="cpu",
                       batch_size=1), task_dir, 1)
    ours = evaluate(LongLoRALM(model=f"hf:{model_dir}", batch_size=3), task_dir, 3)
    theirs, mine = per_document(hf), per_document(ours)
    for task in ("tiny_mc",):
        a = np.array([[float(c[0]) for c in doc] for doc in theirs[task]])
        b = np.array([[float(c[0]) for c in doc] for doc in mine[task]])
        assert a.shape == b.shape == (6, 4)
        np.testing.assert_allclose(b, a, atol=1e-3)
        for metric in ("acc,none", "acc_norm,none"):
            assert ours["results"][task][metric] == hf["results"][task][metric]
    a = np.array([float(doc[0]) for doc in theirs["tiny_rolling"]])
    b = np.array([float(doc[0]) for doc in mine["tiny_rolling"]])
    assert a.shape == (3,) and (a < -100).all()  # 600 characters: several 64-token windows
    np.testing.assert_allclose(b, a, atol=1e-3)
    assert mine["tiny_gen"] == theirs["tiny_gen"]
    assert any(doc[0] for doc in mine["tiny_gen"])  # something was generated


def test_unknown_model_arg_is_one_line(model_dir):
    with pytest.raises(ConfigError, match=r"^unknown model_args key 'colour'; valid: model, "):
        LongLoRALM(model=f"hf:{model_dir}", colour="red")


@pytest.mark.integration
def test_harness_command(model_dir, task_dir, tmp_path):
    """`python -m longlora_jax.harness` = lm-eval's CLI with the model registered; a bad
    model_args key is one error line and exit status 2."""
    def run(*args):
        return subprocess.run([sys.executable, "-m", "longlora_jax.harness", *args],
                              capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
                              env={"PATH": "/usr/bin:/bin", "PYTHONPATH": REPO_ROOT,
                                   "HF_DATASETS_OFFLINE": "1", "JAX_PLATFORMS": "cpu",
                                   "HOME": str(tmp_path)})

    common = ["--model", "longlora_jax", "--tasks", "tiny_mc", "--include_path", str(task_dir)]
    proc = run(*common, "--model_args", f"model=hf:{model_dir}", "--output_path",
               str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiny_mc" in proc.stdout and "acc" in proc.stdout
    proc = run("--model", "longlora_jax", "--model_args", "model=preset:tiny", "--tasks",
               "ruler_offline_fwe", "--metadata", '{"max_seq_lengths": [1024], "samples": 1}')
    assert proc.returncode == 0, proc.stderr[-3000:]  # the project's tasks, found by default
    assert "ruler_offline_fwe" in proc.stdout and "1024" in proc.stdout
    proc = run("--model", "longlora_jax", "--model_args", "model=preset:tiny", "--tasks",
               "ruler_offline_nope")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: Tasks not found: ruler_offline_nope"), proc.stderr[-2000:]
    proc = run(*common, "--model_args", f"model=hf:{model_dir},colour=red")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == textwrap.shorten(
        "error: unknown model_args key 'colour'; valid: model, quantize, rope, dtype, "
        "max_length, max_gen_toks, prefill_chunk", 1000)


def test_offline_ruler_as_lm_eval_tasks_equals_evaluate(monkeypatch):
    """`ruler_offline_*` through lm-eval and `evaluate`'s RULER on one model: the same prompt
    tokens, the same greedy answers, the same scores (template "none" = no chat template)."""
    from longlora_jax.data.tokenizer import encoder
    from longlora_jax.evaluation.lm_eval_tasks.ruler_docs import ruler_dataset
    from longlora_jax.evaluation.ruler import ruler_scores
    from longlora_jax.evaluation.ruler_tasks import Corpus, postprocess
    from longlora_jax.harness import TASKS_DIR

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks, length = ["niah_single_1", "fwe"], 1024
    lm = LongLoRALM(model="preset:tiny", batch_size=2)
    meta = {"model": "preset:tiny", "max_seq_lengths": [length], "samples": 2}
    out = lm_eval.simple_evaluate(
        model=lm, tasks=[f"ruler_offline_{t}" for t in tasks], batch_size=2, log_samples=True,
        task_manager=TaskManager(include_path=str(TASKS_DIR), metadata=meta))
    corpus = Corpus.from_texts([d.text for d in assets.essays()])
    ours = ruler_scores(lm.cfg, lm.variables, lm.tokenizer, corpus, length=length, tasks=tasks,
                        samples=2, template="none", batch=2)
    encode = encoder(lm.tokenizer)
    for task in tasks:
        rows = sorted(out["samples"][f"ruler_offline_{task}"], key=lambda s: s["doc_id"])
        mine = ours["tasks"][task]
        assert [r["doc"]["outputs"] for r in rows] == [e for e, _ in mine["answers"]]
        prompts = [r["arguments"][0][0] for r in rows]
        assert prompts == [r["doc"]["input"] + r["doc"]["gen_prefix"] for r in rows]
        assert np.mean([len(encode(p)) for p in prompts]) == mine["prompt_tokens"]
        assert any(p for _, p in mine["answers"])  # something was generated
        assert [postprocess(r["resps"][0][0]) for r in rows] == [p for _, p in mine["answers"]]
        assert out["results"][f"ruler_offline_{task}"][f"{length},none"] == mine["score"]
    with pytest.raises(ConfigError, match="max_seq_lengths 1000; valid: 1024, 2048"):
        ruler_dataset("vt", max_seq_lengths=[1000], model="preset:tiny")
    with pytest.raises(ConfigError, match="need a tokenizer"):
        ruler_dataset("vt")
