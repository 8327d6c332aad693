"""lm-eval's `hf` backend on the merged export against the `longlora_jax` backend on the workdir.

    PYTHONPATH=. python docs/lm_eval/side_by_side.py [WORKDIR]   # default runs/demo

The README's demo run (trained first when WORKDIR has no summary.json) is exported with
`export --format merged` (rope linear:4 written into its config.json) and both backends run the
same three local lm-eval tasks, one process, float32, max_length 2048 on both sides:

  essays_mc       multiple choice: which of 4 continuations (the true one, three from other
                  essays) follows the first 200 characters of an essay; 24 documents
  essays_rolling  loglikelihood_rolling over the 4 longest essays' first 30000 characters
                  (several 2048-token windows each)
  essays_gen      generate_until: 24 new tokens greedily after 300 characters from the middle
                  of an essay, until "\\n\\n"; 24 documents
(the offline essays of 3000 characters or more: held out from the demo, trained on Austen).

side_by_side.json holds every per-document number of both; side_by_side.md the summary the
README quotes (the largest per-document loglikelihood difference, the accuracies, the number
of identical generations).
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

OUT = pathlib.Path(__file__).parent
TASKS = ("essays_mc", "essays_rolling", "essays_gen")
MAX_LENGTH = 2048


def write_tasks(root: pathlib.Path) -> None:
    """The three tasks as lm-eval YAML over local JSON lines (the offline essays, held out
    from the demo's training text: it trained on Jane Austen)."""
    from longlora_jax.data import assets

    essays = [d.text for d in assets.essays() if len(d.text) >= 3000]
    rng = np.random.default_rng(0)
    mc = []
    for i in range(24):
        others = [essays[(i + k) % len(essays)] for k in (7, 13, 19)]
        choices = [essays[i][200:260]] + [o[1000:1060] for o in others]
        order = rng.permutation(4)
        mc.append({"context": essays[i][:200], "choices": [choices[k] for k in order],
                   "answer": int(np.argmax(order == 0))})
    data = {
        "essays_mc": mc,
        "essays_rolling": [{"text": e[:30000]} for e in sorted(essays, key=len)[-4:]],
        "essays_gen": [{"prompt": e[2000:2300], "answer": e[2300:2400]} for e in essays[:24]],
    }
    bodies = {
        "essays_mc": 'output_type: multiple_choice\ndoc_to_text: "{{context}}"\n'
                     'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
                     "target_delimiter: ''\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        "essays_rolling": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
                          'doc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'
                          "  - metric: bits_per_byte\n",
        "essays_gen": 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\n'
                      'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n\\n"]\n'
                      "  max_gen_toks: 24\n  do_sample: false\nmetric_list:\n"
                      "  - metric: exact_match\n",
    }
    for task, rows in data.items():
        (root / f"{task}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        (root / f"{task}.yaml").write_text(
            f"task: {task}\ndataset_path: json\ntest_split: test\ndataset_kwargs:\n"
            f"  data_files:\n    test: {root / task}.jsonl\n{bodies[task]}")


def per_document(results: dict) -> dict[str, list]:
    return {task: [s["filtered_resps"] for s in sorted(results["samples"][task],
                                                        key=lambda s: s["doc_id"])]
            for task in TASKS}


def main(workdir: pathlib.Path) -> None:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if not (workdir / "summary.json").exists():
        subprocess.run([sys.executable, "-m", "longlora_jax.train", "--config",
                        "configs/demo_cpu.py", "--workdir", str(workdir)], check=True)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from longlora_jax.evaluation.lm_harness import LongLoRALM

    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        merged = root / "merged"
        subprocess.run([sys.executable, "-m", "longlora_jax.export", "--workdir", str(workdir),
                        "--out", str(merged), "--format", "merged"], check=True)
        write_tasks(root)

        def run(lm):
            return lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), batch_size=4,
                                           task_manager=TaskManager(include_path=str(root)),
                                           log_samples=True)

        hf = run(HFLM(pretrained=str(merged), dtype="float32", device="cpu", batch_size=4,
                      max_length=MAX_LENGTH))
        lm = LongLoRALM(model=str(workdir), batch_size=4, max_length=MAX_LENGTH)
        ours = run(lm)
        tokens = np.array([len(lm.tok_encode(json.loads(line)["text"])) for line in
                           (root / "essays_rolling.jsonl").read_text().splitlines()])
    theirs, mine = per_document(hf), per_document(ours)
    mc_theirs = np.array([[float(c[0]) for c in doc] for doc in theirs["essays_mc"]])
    mc_mine = np.array([[float(c[0]) for c in doc] for doc in mine["essays_mc"]])
    roll_theirs = np.array([float(doc[0]) for doc in theirs["essays_rolling"]])
    roll_mine = np.array([float(doc[0]) for doc in mine["essays_rolling"]])
    gen_theirs = [doc[0] for doc in theirs["essays_gen"]]
    gen_mine = [doc[0] for doc in mine["essays_gen"]]
    summary = {
        "mc_max_abs_diff": float(np.abs(mc_mine - mc_theirs).max()),
        "rolling_max_abs_diff": float(np.abs(roll_mine - roll_theirs).max()),
        "acc_hf": hf["results"]["essays_mc"]["acc,none"],
        "acc_longlora_jax": ours["results"]["essays_mc"]["acc,none"],
        "acc_norm_hf": hf["results"]["essays_mc"]["acc_norm,none"],
        "acc_norm_longlora_jax": ours["results"]["essays_mc"]["acc_norm,none"],
        "word_perplexity_hf": hf["results"]["essays_rolling"]["word_perplexity,none"],
        "word_perplexity_longlora_jax": ours["results"]["essays_rolling"][
            "word_perplexity,none"],
        "rolling_max_rel_diff": float(np.abs((roll_mine - roll_theirs) / roll_theirs).max()),
        "rolling_max_diff_per_token": float(np.abs((roll_mine - roll_theirs) / tokens).max()),
        "exact_match_hf": hf["results"]["essays_gen"]["exact_match,none"],
        "exact_match_longlora_jax": ours["results"]["essays_gen"]["exact_match,none"],
        "generations_identical": sum(a == b for a, b in zip(gen_theirs, gen_mine, strict=True)),
        "generations": len(gen_mine),
    }
    result = {
        "command": "PYTHONPATH=. python docs/lm_eval/side_by_side.py " + str(workdir),
        "workdir": str(workdir), "max_length": MAX_LENGTH, "summary": summary,
        "rolling_tokens": tokens.tolist(),
        "documents": {"mc_loglikelihoods": {"hf": mc_theirs.tolist(),
                                            "longlora_jax": mc_mine.tolist()},
                      "rolling_loglikelihoods": {"hf": roll_theirs.tolist(),
                                                 "longlora_jax": roll_mine.tolist()},
                      "generations": {"hf": gen_theirs, "longlora_jax": gen_mine}},
    }
    (OUT / "side_by_side.json").write_text(json.dumps(result, indent=1) + "\n")
    s = summary
    rows = [
        ("essays_mc (24 docs) acc", s["acc_hf"], s["acc_longlora_jax"],
         f"loglikelihoods within {s['mc_max_abs_diff']:.1e}"),
        ("essays_mc acc_norm", s["acc_norm_hf"], s["acc_norm_longlora_jax"], ""),
        (f"essays_rolling ({len(tokens)} essays, {sum(tokens)} tokens) word perplexity",
         s["word_perplexity_hf"], s["word_perplexity_longlora_jax"],
         f"loglikelihoods within {s['rolling_max_abs_diff']:.1e} "
         f"({s['rolling_max_rel_diff']:.1e} relative, "
         f"{s['rolling_max_diff_per_token']:.1e} per token)"),
        ("essays_gen (24 prompts) exact_match", s["exact_match_hf"],
         s["exact_match_longlora_jax"],
         f"{s['generations_identical']}/{s['generations']} greedy generations identical"),
    ]
    table = "\n".join(f"| {name} | {a:.4f} | {b:.4f} | {note} |" for name, a, b, note in rows)
    (OUT / "side_by_side.md").write_text(
        "# lm-eval: `hf` on the merged export vs `longlora_jax` on the workdir\n\n"
        f"Written by `{result['command']}` (side_by_side.json); {workdir} is the README's "
        "demo run.\n\n| task | lm-eval `hf` (merged export) | `longlora_jax` (workdir) | "
        f"per document |\n|---|---:|---:|---|\n{table}\n")
    print((OUT / "side_by_side.md").read_text())


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo"))
