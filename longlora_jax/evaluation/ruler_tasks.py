"""RULER's synthetic long-context tasks (arXiv 2404.06654), built offline, and their scoring.

    sample = build_sample("niah_multikey_1", size=300, seed=0, corpus=corpus)
    score = string_match_all([prediction], [list(sample.outputs)])

The thirteen tasks of RULER's synthetic set that need no download, with its templates, answer
prefixes, generation budgets and task settings (`TASKS`):

  niah_single_1/2/3      one needle "One of the special magic numbers for KEY is: VALUE." in
                         repeated noise sentences / in essays; the value a 7-digit number /
                         a word pair / a UUID
  niah_multikey_1/2/3    distractor needles with other keys: in essays (4 keys) / the haystack
                         is all needles (words -> numbers, UUIDs -> UUIDs)
  niah_multivalue        one key, 4 values, all asked for
  niah_multiquery        4 keys, all asked for
  vt                     variable tracking: "VAR ABCDE = 12345", then 4 hops "VAR X = VAR Y"
                         hidden in noise; which variables are 12345? (one worked example first)
  cwe                    common words: 10 words repeated 30x among words repeated 3x (6x/1x
                         below 4096 tokens); the 10 most common? (one worked example first)
  fwe                    frequent words: 6-letter coded words drawn from a Zipf law (alpha 2)
                         whose most frequent word is '...' (noise); the 3 most frequent others?

`size` is the haystack's size in the task's unit (noise sentences, essay words, needles,
listed words, coded words); `ruler.fit_sample` picks the largest that fits a length in tokens.
Differences from RULER's scripts, all to stay offline: the haystack is the offline copy of the
same Paul Graham essays (`data.assets.essays`, name order); RULER's word lists (wonderwords,
for key words and the common words) are replaced by the essays' own vocabulary (`Corpus`),
key words being two of them joined by '-' as RULER's adjective-noun keys are; sentences are
split at [.!?] + whitespace (RULER: nltk); vt's worked example has min(20, size) noise
sentences (RULER sizes it to 500 tokens).

Scoring is RULER's `string_match_all`: per sample, the fraction of the expected strings that
occur (case-insensitively) in the prediction, after `postprocess` (strip, control characters
to newlines); a task's score is the mean over samples, in percent.
"""

from __future__ import annotations

import dataclasses
import random
import re
import string
import uuid
from collections.abc import Sequence

import numpy as np
from scipy.special import zeta

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
         "again.")
DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True))]  # percent

NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to "
    "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are "
    "all the special magic {type_needle_v} for {query} mentioned in the provided text?")
NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text "
    "above.")
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, "
             "{num_v} variables are assigned the value {query}, they are: ")
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most "
    "common words in the above list?")
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three "
    "most frequently appeared coded words. {context}\nQuestion: Do not provide any "
    "explanation. Please ignore the dots '....'. What are the three most frequently appeared "
    "words in the above coded text?")
FWE_PREFIX = (" Answer: According to the coded text above, the three most frequently appeared "
              "words are:")


@dataclasses.dataclass(frozen=True)
class Niah:
    haystack: str  # noise | essay | needle
    key_type: str  # words | numbers | uuids
    value_type: str
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    new_tokens: int = 128


@dataclasses.dataclass(frozen=True)
class VariableTracking:
    num_chains: int = 1
    num_hops: int = 4
    new_tokens: int = 30


@dataclasses.dataclass(frozen=True)
class CommonWords:
    freq_cw: int = 30
    freq_ucw: int = 3
    num_cw: int = 10
    new_tokens: int = 120


@dataclasses.dataclass(frozen=True)
class FrequentWords:
    alpha: float = 2.0
    coded_wordlen: int = 6
    new_tokens: int = 50


TASKS = {
    "niah_single_1": Niah("noise", "words", "numbers"),
    "niah_single_2": Niah("essay", "words", "numbers"),
    "niah_single_3": Niah("essay", "words", "uuids"),
    "niah_multikey_1": Niah("essay", "words", "numbers", num_keys=4),
    "niah_multikey_2": Niah("needle", "words", "numbers"),
    "niah_multikey_3": Niah("needle", "uuids", "uuids"),
    "niah_multivalue": Niah("essay", "words", "numbers", num_values=4),
    "niah_multiquery": Niah("essay", "words", "numbers", num_queries=4),
    "vt": VariableTracking(),
    "cwe": CommonWords(),
    "fwe": FrequentWords(),
}


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The essays as RULER's haystack (whitespace-separated words of all essays, joined) and
    their distinct lowercase words (>= 3 letters, sorted) as the word list."""

    haystack: tuple[str, ...]
    words: tuple[str, ...]

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> Corpus:
        joined = re.sub(r"\s+", " ", " ".join(texts)).strip()
        words = sorted({w.lower() for w in re.findall(r"[A-Za-z]{3,}", joined)})
        return cls(tuple(joined.split(" ")), tuple(words))


@dataclasses.dataclass(frozen=True)
class Sample:
    """One prompt: `text` is the user message (the task template with its context, worked
    examples first), `answer_prefix` follows the (chat-templated) prompt, `outputs` are the
    strings a correct answer contains, `depths` (niah) where the needles were put: percent of
    the haystack before each (essay: of its sentences; noise, needle: of its lines), sorted."""

    task: str
    text: str
    answer_prefix: str
    outputs: tuple[str, ...]
    new_tokens: int
    depths: tuple[float, ...] = ()


def _value(kind: str, rng: random.Random, corpus: Corpus) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return f"{rng.choice(corpus.words)}-{rng.choice(corpus.words)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}")


def _sentences(text: str) -> list[str]:
    return re.split(r"(?<=[.!?])\s+", text.strip())


def _niah(name: str, spec: Niah, size: int, rng: random.Random, corpus: Corpus) -> Sample:
    num_keys = max(spec.num_keys, spec.num_queries)
    kind_v = spec.value_type
    keys, values, needles = [], [], []
    for _ in range(num_keys):
        keys.append(_value(spec.key_type, rng, corpus))
        values.append([_value(kind_v, rng, corpus) for _ in range(spec.num_values)])
        needles += [NEEDLE.format(type_needle_v=kind_v, key=keys[-1], value=v)
                    for v in values[-1]]
    rng.shuffle(needles)
    if spec.haystack == "essay":
        repeats = -(-size // len(corpus.haystack))
        sents = _sentences(" ".join((corpus.haystack * repeats)[:size]))
        depths = sorted(rng.sample(DEPTHS, len(needles)))
        cuts = [0, *(int(len(sents) * d / 100) for d in depths), len(sents)]
        parts = []
        for i in range(1, len(cuts)):
            parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
            if i - 1 < len(needles):
                parts.append(needles[i - 1])
        context = " ".join(parts)
    else:
        if spec.haystack == "noise":
            sents = [NOISE] * size
        else:
            sents = [NEEDLE.format(type_needle_v=kind_v, key=_value(spec.key_type, rng, corpus),
                                   value=_value(kind_v, rng, corpus)) for _ in range(size)]
        indexes = sorted(rng.sample(range(size), len(needles)), reverse=True)
        for index, needle in zip(indexes, needles, strict=True):
            sents.insert(index, needle)
        context = "\n".join(sents)
        depths = sorted(100 * i / size for i in indexes)
    asked = rng.sample(range(num_keys), spec.num_queries)
    queries = [keys[i] for i in asked]
    answers = tuple(v for i in asked for v in values[i])
    query = (", ".join(queries[:-1]) + ", and " + queries[-1]) if len(queries) > 1 else queries[0]
    template, prefix = NIAH_TEMPLATE, NIAH_PREFIX
    if spec.num_queries * spec.num_values == 1:  # RULER's singular wording
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template, prefix = template.replace(old, new), prefix.replace(old, new)
        kind_v = kind_v[:-1]
    text = template.format(type_needle_v=kind_v, context=context, query=query)
    return Sample(name, text, prefix.format(type_needle_v=kind_v, query=query), answers,
                  spec.new_tokens, tuple(depths))


def _chain_text(spec: VariableTracking, noises: int, rng: random.Random, letters: int,
                value: str) -> tuple[str, list[str]]:
    """(VT context, the first chain's variables): chains hidden in `noises` noise sentences."""
    names: list[str] = []
    while len(set(names)) < spec.num_chains * (spec.num_hops + 1):
        names.append("".join(rng.choices(string.ascii_uppercase, k=letters)))
    names = list(dict.fromkeys(names))
    sents = [NOISE] * noises
    chains = []
    for c in range(spec.num_chains):
        chain_vars = names[c * (spec.num_hops + 1):(c + 1) * (spec.num_hops + 1)]
        chain = [f"VAR {chain_vars[0]} = {value if c == 0 else rng.randint(10000, 99999)}"]
        chain += [f"VAR {chain_vars[j + 1]} = VAR {chain_vars[j]} "
                  for j in range(spec.num_hops)]
        chains.append((chain_vars, chain))
        positions = sorted(rng.sample(range(len(sents)), len(chain)))
        for j, (pos, line) in enumerate(zip(positions, chain, strict=True)):
            sents.insert(pos + j, line)
    return "\n".join(sents).replace(". \n", ".\n"), chains[0][0]


def _vt(name: str, spec: VariableTracking, size: int, rng: random.Random) -> Sample:
    num_v = spec.num_hops + 1
    # the worked example (RULER's in-context example): 3-letter names, its answer given
    example_value = str(rng.randint(10000, 99999))
    context, example_vars = _chain_text(spec, min(20, size), rng, 3, example_value)
    example = (VT_TEMPLATE.format(context=context, query=example_value)
               + VT_PREFIX.format(num_v=num_v, query=example_value) + " ".join(example_vars))
    value = str(rng.randint(10000, 99999))
    context, variables = _chain_text(spec, size, rng, 5, value)
    text = example + "\n" + VT_TEMPLATE.format(context=context, query=value)
    return Sample(name, text, VT_PREFIX.format(num_v=num_v, query=value), tuple(variables),
                  spec.new_tokens)


def _cwe(name: str, spec: CommonWords, size: int, rng: random.Random, corpus: Corpus,
         length: int) -> Sample:
    def example(num_words: int, common: int, uncommon: int) -> tuple[str, list[str]]:
        chosen = rng.sample(corpus.words, num_words)
        words = chosen[:spec.num_cw] * common + chosen[spec.num_cw:] * uncommon
        rng.shuffle(words)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words)), chosen[:spec.num_cw]

    if length < 4096:  # RULER's short setting
        shot, (context, answer) = example(20, 3, 1), example(max(size, spec.num_cw + 1), 6, 1)
    else:
        shot = example(40, 10, 3)
        context, answer = example(max(size, spec.num_cw + 1), spec.freq_cw, spec.freq_ucw)
    shot_text = (CWE_TEMPLATE.format(context=shot[0]) + CWE_PREFIX + " "
                 + " ".join(f"{i + 1}. {w}" for i, w in enumerate(shot[1])))
    text = shot_text + "\n" + CWE_TEMPLATE.format(context=context)
    return Sample(name, text, CWE_PREFIX, tuple(answer), spec.new_tokens)


def _fwe(name: str, spec: FrequentWords, size: int, rng: random.Random, length: int) -> Sample:
    vocab_size = max(length // 50, 4)
    vocab: list[str] = []
    while len(set(vocab)) < vocab_size:
        vocab.append("".join(rng.choices(string.ascii_lowercase, k=spec.coded_wordlen)))
    vocab = sorted(set(vocab))
    rng.shuffle(vocab)
    vocab[0] = "..."  # the most frequent word is noise
    ranks = np.arange(1, len(vocab) + 1)
    counts = (size * ranks ** -spec.alpha / zeta(spec.alpha)).astype(int)
    words = [w for w, n in zip(vocab, counts, strict=True) for _ in range(n)]
    rng.shuffle(words)
    return Sample(name, FWE_TEMPLATE.format(context=" ".join(words)), FWE_PREFIX,
                  tuple(vocab[1:4]), spec.new_tokens)


def build_sample(task: str, *, size: int, seed: int, corpus: Corpus, length: int) -> Sample:
    """Sample `seed` of `task` with a haystack of `size` units (see the module docstring);
    `length` (tokens) picks cwe's setting and fwe's vocabulary, as in RULER. The same
    (task, seed, size) always gives the same sample."""
    spec = TASKS[task]
    rng = random.Random(f"{task}/{seed}")
    size = max(size, 1)
    if isinstance(spec, Niah):
        return _niah(task, spec, max(size, spec.num_keys * spec.num_values), rng, corpus)
    if isinstance(spec, VariableTracking):  # (each chain line goes before a noise line)
        return _vt(task, spec, max(size, spec.num_hops + 1), rng)
    if isinstance(spec, CommonWords):
        return _cwe(task, spec, size, rng, corpus, length)
    return _fwe(task, spec, size, rng, length)


def postprocess(prediction: str) -> str:
    """RULER's `postprocess_pred`: stripped, control characters turned into newlines."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER's score: mean over samples of the fraction of references (case-insensitive)
    contained in the prediction, in percent, rounded to 2 decimals."""
    per_sample = [sum(r.lower() in p.lower() for r in refs) / len(refs)
                  for p, refs in zip(predictions, references, strict=True)]
    return round(100 * sum(per_sample) / len(per_sample), 2)
