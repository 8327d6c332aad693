"""Where our train step's time goes: `python -m longlora_jax.bench profile`.

One step of `bench train`'s LongLoRA step (SmolLM2 shape, S2 + LoRA+, AdamW; same settings)
runs under the XLA profiler (`jax.profiler`). Every executed HLO instruction's *self* time
(its events' time on each thread minus the instructions nested in it, e.g. a while loop's
body) is summed over the threads, and attributed two ways from the compiled HLO:

  kind    matmul (the instruction or the fusion it calls computes a dot or convolution),
          scatter/gather (dynamic slices and updates, gathers, scatters), copy/transpose,
          reduce, elementwise (the rest), loop control (while/call/conditional themselves)
  place   the innermost frame of this project's code that emitted it (file:function), from
          the HLO's stack frames; optax's and jax's own frames are named by their file

`busy` is the instructions' summed time over `wall x threads`: what the step leaves idle
(waiting between thunks, a single-threaded op on a multi-core machine). The traced step's
wall time is printed beside an untraced one (the profiler's overhead).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import re
import tempfile
import time
from typing import Any

import jax
import ml_collections

from longlora_jax.benchmarks import train_step
from longlora_jax.benchmarks.common import machine, markdown_table

KINDS = ("matmul", "scatter/gather", "copy/transpose", "reduce", "elementwise", "loop control")
_SCATTER = ("scatter(", "gather(", "dynamic-slice(", "dynamic-update-slice(")
_LOOPS = ("while(", "call(", "conditional(")


def default_config() -> ml_collections.ConfigDict:
    """lengths, layers, top (places listed), and `bench train`'s model settings."""
    c = train_step.default_config()
    c.lengths = (8192,)
    c.layers = 30
    c.top = 15
    return c


@dataclasses.dataclass
class HloIndex:
    """instruction name -> its kind (`KINDS`) and its place (file:function)."""

    kind: dict[str, str]
    place: dict[str, str]


def _sections(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
        start = text.find(f"\n{name}\n")
        if start >= 0:
            body = text[start + len(name) + 2:]
            out[name] = body[:body.find("\n\n")].splitlines()
    return out


def _frames(text: str) -> dict[int, str]:
    """stack frame id -> "file:function" of its innermost frame in this project (else the
    innermost frame's file)."""
    sec = _sections(text)
    files = {int(ln.split()[0]): ln.split(None, 1)[1].strip('"')
             for ln in sec.get("FileNames", [])}
    funcs = {int(ln.split()[0]): ln.split(None, 1)[1].strip('"')
             for ln in sec.get("FunctionNames", [])}
    locations = {}
    for line in sec.get("FileLocations", []):
        fields = dict(re.findall(r"(\w+)=(\d+)", line))
        locations[int(line.split()[0])] = (files[int(fields["file_name_id"])],
                                           funcs[int(fields["function_name_id"])])
    parents = {}
    for line in sec.get("StackFrames", []):
        fields = dict(re.findall(r"(\w+)=(\d+)", line))
        parents[int(line.split()[0])] = (int(fields["file_location_id"]),
                                         int(fields["parent_frame_id"]))

    def place(frame: int) -> str:
        seen, first = set(), None
        while frame in parents and frame not in seen:
            seen.add(frame)
            path, function = locations[parents[frame][0]]
            first = first or path.split("/")[-1]
            if "/longlora_jax/" in path and "/benchmarks/" not in path:
                return f"{path.split('/longlora_jax/')[-1]}:{function.split('.<locals>')[0]}"
            frame = parents[frame][1]
        return first or "?"

    return {frame: place(frame) for frame in parents}


def hlo_index(text: str) -> HloIndex:
    """Kinds and places of the instructions of a compiled module's text (`as_text()`)."""
    computations: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            current = header.group(1)
            computations[current] = []
        elif current and line.strip() == "}":
            current = None
        elif current:
            computations[current].append(line)

    def contains(name: str, needles: tuple[str, ...], seen: set[str]) -> bool:
        if name in seen or name not in computations:
            return False
        seen.add(name)
        for line in computations[name]:
            if any(f" {n}" in line for n in needles):
                return True
            if any(contains(c, needles, seen) for c in re.findall(r"calls=%([\w.\-]+)", line)):
                return True
        return False

    frames = _frames(text)
    kind, place = {}, {}
    for lines in computations.values():
        for line in lines:
            m = re.match(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?\b([a-z\-]+)\(", line)
            if not m:
                continue
            name, op = m.groups()
            called = re.findall(r"calls=%([\w.\-]+)", line) if op == "fusion" else []

            def fuses(needles: tuple[str, ...], called=called) -> bool:
                return any(contains(c, needles, set()) for c in called)

            if f"{op}(" in _LOOPS:
                kind[name] = "loop control"
            elif op in ("dot", "convolution") or fuses(("dot(", "convolution(")):
                kind[name] = "matmul"
            elif f"{op}(" in _SCATTER or fuses(_SCATTER):
                kind[name] = "scatter/gather"
            elif op in ("copy", "transpose") or "copy" in name or "transpose" in name:
                kind[name] = "copy/transpose"
            elif op == "reduce" or fuses(("reduce(",)):
                kind[name] = "reduce"
            else:
                kind[name] = "elementwise"
            frame = re.search(r"stack_frame_id=(\d+)", line)
            place[name] = frames.get(int(frame.group(1)), "?") if frame else "?"
    return HloIndex(kind, place)


def self_seconds(xspace_path: str, names: set[str]) -> tuple[dict[str, float], int]:
    """Per HLO instruction in `names`, its self time summed over the threads of the trace's
    host plane; and the number of threads that ran any."""
    totals: dict[str, float] = collections.defaultdict(float)
    threads = 0
    for plane in jax.profiler.ProfileData.from_file(xspace_path).planes:
        for line in plane.lines:
            events = sorted(((e.start_ns, e.end_ns, e.name) for e in line.events),
                            key=lambda e: (e[0], -e[1]))
            if not any(name in names for _, _, name in events):
                continue
            threads += 1
            stack: list[list[Any]] = []  # [end, name, self_ns]
            for start, end, name in events:
                while stack and stack[-1][0] <= start:
                    done = stack.pop()
                    totals[done[1]] += done[2] / 1e9
                if stack:
                    stack[-1][2] -= end - start
                stack.append([end, name, end - start])
            for done in stack:
                totals[done[1]] += done[2] / 1e9
    return {k: v for k, v in totals.items() if k in names}, threads


def profile_length(n: int, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """One traced step at `n` tokens: seconds by kind and by place."""
    step_fn, state, frozen, batch = train_step.our_step_parts(n, config)
    compiled = step_fn.lower(state, frozen, batch).compile()
    index = hlo_index(compiled.as_text())
    state, metrics = compiled(state, frozen, batch)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics)
    untraced = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):  # stops the trace on an error too
            start = time.perf_counter()
            state, metrics = compiled(state, frozen, batch)
            jax.block_until_ready(metrics)
            traced = time.perf_counter() - start
        (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
        seconds, threads = self_seconds(path, set(index.kind))
    total = sum(seconds.values())
    by_kind = collections.Counter()
    by_place = collections.Counter()
    for name, s in seconds.items():
        by_kind[index.kind[name]] += s
        by_place[(index.place[name], index.kind[name])] += s
    return {"N": n, "layers": config.layers, "step s": untraced, "traced step s": traced,
            "threads": threads, "op thread-seconds": total,
            "busy": total / (traced * threads) if threads else None,
            "by_kind": {k: by_kind[k] for k in KINDS},
            "by_place": [{"place": p, "kind": k, "thread-seconds": s}
                         for (p, k), s in by_place.most_common()]}


def run(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """Profiles each length; prints the tables, writes every row (with `json`)."""
    rows = []
    for n in config.lengths:
        result = profile_length(n, config)
        total = result["op thread-seconds"]
        print(f"## N={n}: step {result['step s']:.2f} s (traced {result['traced step s']:.2f} "
              f"s), {result['threads']} threads, busy {result['busy']:.0%}", flush=True)
        print(markdown_table(
            [{"kind": k, "thread-s": s, "share": f"{s / total:.1%}"}
             for k, s in result["by_kind"].items()], ("kind", "thread-s", "share")))
        print(markdown_table(
            [{**p, "share": f"{p['thread-seconds'] / total:.1%}"}
             for p in result["by_place"][:config.top]],
            ("place", "kind", "thread-seconds", "share")), flush=True)
        rows.append(result)
    meta = {"command": "profile", "model": "SmolLM2-135M shape", "batch": 1,
            "mode": "lora_plus r=8",
            "attention": f"S2 G=N*{config.attention.group_size_ratio}",
            "remat": config.model.remat, "frozen_dtype": config.model.frozen_dtype,
            "timing": "one step under jax.profiler; self time per HLO instruction"}
    summary = [{"N": r["N"], "step s": r["step s"], "busy": r["busy"],
                **{k: r["by_kind"][k] / r["op thread-seconds"] for k in KINDS}} for r in rows]
    print(markdown_table(summary, ("N", "step s", "busy", *KINDS)))
    if config.json:
        with open(config.json, "w") as f:
            json.dump({"meta": {**machine(), **meta}, "rows": rows}, f, indent=2)
    return rows
