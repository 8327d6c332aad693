"""`pip install .` gives an importable package whose commands run, and pyproject's dependency
ranges admit the pinned set the tests run with."""

import os
import pathlib
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.integration


def _pins(path: pathlib.Path) -> dict[str, str]:
    """{name: version} of the `name==version` lines of a requirements file (and its -r)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            pins.update(_pins(path.parent / line[3:].strip()))
        elif "==" in line:
            name, version = line.split("==")
            pins[Requirement(name).name.lower().replace("_", "-")] = version.strip()
    return pins


def test_dependency_ranges_admit_the_pinned_versions():
    project = tomllib.loads((pathlib.Path(REPO_ROOT) / "pyproject.toml").read_text())["project"]
    pins = _pins(pathlib.Path(REPO_ROOT) / "requirements-test.txt")
    runtime = {Requirement(r).name.lower().replace("_", "-")
               for r in project["dependencies"]}
    required = {Requirement(line.split("==")[0]).name.lower().replace("_", "-")
                for line in (pathlib.Path(REPO_ROOT) / "requirements.txt").read_text()
                .splitlines() if line.strip() and not line.startswith("#")}
    assert required - {"jaxlib"} <= runtime, required - runtime  # jaxlib comes with jax
    for spec in project["dependencies"] + project["optional-dependencies"]["test"]:
        requirement = Requirement(spec)
        name = requirement.name.lower().replace("_", "-")
        if name in pins:
            assert requirement.specifier.contains(pins[name], prereleases=True), (spec, pins[name])
    assert set(project["optional-dependencies"]) == {"tpu", "gpu", "eval", "test"}
    for spec in project["optional-dependencies"]["eval"]:  # the eval extra is tested too
        requirement = Requirement(spec)
        assert requirement.specifier.contains(pins[requirement.name.lower()], prereleases=True)


def test_installed_package_imports_and_runs(tmp_path):
    """`pip install --no-deps .` into a fresh directory: the installed copy (not the checkout)
    imports and `python -m longlora_jax.train --help` works from elsewhere."""
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target), REPO_ROOT],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import longlora_jax; "
                            "print(longlora_jax.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert where.returncode == 0, where.stderr[-3000:]
    assert where.stdout.startswith(str(target)), where.stdout
    for sub in ("modeling", "io", "data", "training", "evaluation", "inference", "parallel",
                "cli", "benchmarks"):
        assert (target / "longlora_jax" / sub / "__init__.py").is_file(), sub
    tasks = target / "longlora_jax" / "evaluation" / "lm_eval_tasks"  # lm-eval's task files
    assert {p.name for p in tasks.glob("*.yaml")} == {
        p.name for p in (pathlib.Path(REPO_ROOT) / tasks.relative_to(target)).glob("*.yaml")}
    assert len(list(tasks.glob("*.yaml"))) == 12
    helped = subprocess.run([sys.executable, "-m", "longlora_jax.train", "--help"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert helped.returncode == 0 and "--workdir" in helped.stdout, helped.stderr[-3000:]
