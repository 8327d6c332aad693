"""`python -m tests.fuzz_count`: runs the fuzz suite (tests/test_fuzz.py) and, when every
input ended cleanly, writes docs/reliability/fuzz.json: per reader, the inputs tried and how
many were read and how many refused with one line (docs/reliability.md quotes it)."""

import json
import os
import pathlib
import sys
import tempfile
import time

import pytest

from tests import test_fuzz

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "reliability" / "fuzz.json"


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        counts = pathlib.Path(folder) / "counts.json"
        os.environ["LONGLORA_FUZZ_REPORT"] = str(counts)
        start = time.time()
        code = pytest.main(["-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_fuzz.py")])
        if code != 0:
            print("fuzz suite failed; docs/reliability/fuzz.json left as it was", file=sys.stderr)
            return int(code)
        readers = json.loads(counts.read_text())
    readers.pop("seed", None)
    rows = {name: {"inputs": sum(c.values()), "read": c.get("read", 0),
                   "refused": c.get("refused", 0), "failed": 0}
            for name, c in readers.items()}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "command": "python -m tests.fuzz_count",
        "hypothesis": __import__("hypothesis").__version__,
        "examples_per_strategy": test_fuzz.EXAMPLES,
        "seconds": round(time.time() - start, 1),
        "readers": rows,
    }, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
