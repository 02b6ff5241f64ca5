"""``snakemake --profile slurm`` for real: the repository's profile on a one-node Slurm cluster.

The cluster (``tests/slurm/cluster.sh``: munged, slurmctld, slurmd on localhost, partition
``debug``, one fake GPU, no accounting) is started once per session and stopped afterwards.
The profile is used as a user would use it: ``slurm/config.yaml`` copied with only its
partition and account placeholders filled in.

Without Slurm installed these tests are skipped, except in CI (``CI=true``), where they fail:
``tests/slurm/install.sh`` installs it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
TEST_PARTITION = "debug"  # the one partition of tests/slurm/cluster.sh
TEST_ACCOUNT = "xrai-test"  # any name: the test cluster keeps no accounts
PLACEHOLDERS = {
    '"FILL_IN_PARTITION"': f'"{TEST_PARTITION}"',
    '"FILL_IN_GPU_PARTITION"': f'"{TEST_PARTITION}"',
    '"FILL_IN_ACCOUNT"': f'"{TEST_ACCOUNT}"',
}
PIPELINE_TIMEOUT_S = 1200
PREEMPTION_TIMEOUT_S = 900

# What the Slurm executor and Snakemake print for every job.
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+)")
FINISHED = re.compile(r"Finished jobid: (\d+) \(Rule: (\w+)\)")
# What `xrai train` logs (src/xrai/train.py).
STOPPED = re.compile(r"stopped by SIGTERM at step (\d+)/(\d+); checkpoint written")
RESUMED = re.compile(r"resumed from \S+checkpoint\.pt at step (\d+)")


# --------------------------------------------------------------------------- helpers


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def small_test_config() -> dict:
    """config/test.yaml smaller still (fewer images, small networks, few steps): every rule, about Slurm only."""
    config = yaml.safe_load((REPO / "config/test.yaml").read_text())
    config["simulation"].update(train_sizes=[128], test_size=32)
    config["train"].update(steps=30, batch_size=8, checkpoint_every=10, eval_every=30, eval_images=16, log_every=5,
                           encoder={"channels": [8, 16], "mlp": [32]}, decoder={"width": 32})
    config["train"]["methods"] = [dict(m, steps=min(m.get("steps", 30), 30), decoder={"width": 32})
                                  for m in config["train"]["methods"]]
    config["train"]["xrai"] = dict(config["train"]["xrai"], search_steps=20, memory_images=[64, 128])
    config["phasing"].update(n_starts=1, n_iterations=50)
    return config


def sh(*cmd: str | Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)


def snakemake_env(pdb_mirror: Path) -> dict[str, str]:
    """This process's environment for Snakemake: no leftover Slurm job settings, the PDB mirror."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["XRAI_PDB_MIRROR"] = str(pdb_mirror)
    return env


class SnakemakeRun:
    """``python -m snakemake ARGS`` in the background, its output in ``log``.

    :meth:`wait` interrupts it at the deadline (Snakemake then cancels its Slurm jobs),
    so a stuck job fails the test instead of hanging it.
    """

    def __init__(self, args: list[str | Path], log: Path, env: dict[str, str], cwd: Path = REPO) -> None:
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "snakemake", *map(str, args)], cwd=cwd,
                                         env=env, stdout=out, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"snakemake still running after {timeout:.0f} s; its output ends with:\n"
                        + self.output()[-4000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # Snakemake cancels its Slurm jobs (scancel)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def slurm_jobs() -> dict[str, dict[str, str]]:
    """Every job the test cluster remembers (finished ones for MinJobAge = 1 h): id -> state, comment."""
    res = sh("squeue", "--states=all", "--noheader", "--format=%i|%T|%k")
    assert res.returncode == 0, res.stderr
    jobs = {}
    for line in res.stdout.splitlines():
        job_id, state, comment = line.strip().split("|", 2)
        jobs[job_id] = {"state": state, "comment": comment}
    return jobs


def slurm_job_ids_by_rule(output: str) -> dict[str, list[str]]:
    """Slurm job ids per rule, from Snakemake's output (its job id -> rule, then -> Slurm id)."""
    rule_of = {}
    for block in re.split(r"\n(?=\[[^\n]*\]\n)", output):
        m = re.search(r"^rule (\w+):\n(?:.*\n)*?\s+jobid: (\d+)$", block, re.M)
        if m:
            rule_of[m.group(2)] = m.group(1)
    ids: dict[str, list[str]] = {}
    for job, slurm_id in SUBMITTED.findall(output):
        ids.setdefault(rule_of.get(job, "?"), []).append(slurm_id)
    return ids


def dry_run_jobs(output: str) -> list[dict]:
    """The jobs of ``snakemake -n`` output: rule, wildcards and resources of each."""
    jobs = []
    for block in re.split(r"\n(?=rule \w+:\n)", output):
        m = re.match(r"rule (\w+):\n", block)
        if not m:
            continue
        fields = {}
        for key in ("wildcards", "resources"):
            line = re.search(rf"^\s+{key}: (.*)$", block, re.M)
            fields[key] = dict(kv.split("=", 1) for kv in line.group(1).split(", ")) if line else {}
        jobs.append({"rule": m.group(1), **fields})
    return jobs


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def slurm_cluster():
    """The one-node test cluster, started (and stopped afterwards) unless it already runs."""
    if shutil.which("slurmctld", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin") is None:
        msg = "Slurm is not installed: run `sudo tests/slurm/install.sh`"
        if in_ci():
            pytest.fail(f"{msg} (CI=true: the Slurm tests must run in CI, see .ci/run)")
        pytest.skip(msg)
    was_running = "slurmctld: running" in sh(CLUSTER, "status").stdout
    start = sh(CLUSTER, "start", timeout=120)
    if start.returncode != 0:
        pytest.fail(f"tests/slurm/cluster.sh start failed:\n{start.stdout}{start.stderr}")
    yield TEST_PARTITION
    if not was_running:
        stop = sh(CLUSTER, "stop", timeout=120)
        assert stop.returncode == 0, stop.stdout + stop.stderr


@pytest.fixture(scope="session")
def site_profile(tmp_path_factory) -> Path:
    """``slurm/config.yaml`` as a user fills it in: the partition and account placeholders, nothing else."""
    text = (REPO / "slurm" / "config.yaml").read_text()
    for placeholder, value in PLACEHOLDERS.items():
        assert placeholder in text, f"slurm/config.yaml lost its {placeholder} placeholder"
        text = text.replace(placeholder, value)
    profile = tmp_path_factory.mktemp("profile") / "slurm"
    profile.mkdir()
    (profile / "config.yaml").write_text(text)
    return profile


# --------------------------------------------------------------------------- tests


def test_profile_dry_run_requests_a_gpu_for_each_paper_training_job(tmp_path):
    """``snakemake --profile slurm -n`` from the repository root, paper config: 30 X-RAI runs on GPUs."""
    res = subprocess.run([sys.executable, "-m", "snakemake", "--profile", "slurm", "-n",
                          "--configfile", "config.yaml", "--directory", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "Using profile slurm" in res.stdout + res.stderr
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    want = config["resources"]["train"]
    jobs = dry_run_jobs(res.stdout)
    train = [j for j in jobs if j["rule"] == "train"]
    xrai = [j for j in train if j["wildcards"]["method"] == "xrai"]
    runs = {(j["wildcards"]["protein"], j["wildcards"]["size"], j["wildcards"]["run"]) for j in xrai}
    assert len(xrai) == len(runs) == 2 * 3 * 5
    for job in train:
        res_ = job["resources"]
        assert res_["gpu"] == "1", job
        # amounts come from the config's resources (the single source), placement from the profile
        assert int(res_["mem_mb"]) == want["mem_mb"] and int(res_["runtime"]) == want["runtime"], job
        assert int(res_["cpus_per_task"]) == want["cpus_per_task"], job
        assert res_["slurm_partition"] == "FILL_IN_GPU_PARTITION", job
        assert res_["slurm_account"] == "FILL_IN_ACCOUNT", job
    others = [j for j in jobs if j["rule"] not in ("train", "all")]
    assert {j["rule"] for j in others} >= {"fetch_pdb", "simulate", "phase", "evaluate", "table"}
    for job in others:
        assert job["resources"].get("gpu", "0") == "0", job
        assert job["resources"]["slurm_partition"] == "FILL_IN_PARTITION", job
        assert job["resources"]["slurm_account"] == "FILL_IN_ACCOUNT", job


@pytest.mark.slow
def test_pipeline_runs_every_job_as_a_slurm_job(slurm_cluster, site_profile, pdb_mirror, tmp_path):
    """The whole pipeline (every rule of config/test.yaml, smaller) through ``--profile slurm``.

    Every job is a completed Slurm job and Table 1 exists.
    """
    work = tmp_path / "work"
    cfg_path = tmp_path / "small.yaml"
    cfg_path.write_text(yaml.safe_dump(small_test_config(), sort_keys=False))
    run = SnakemakeRun(["-s", REPO / "Snakefile", "--directory", work, "--configfile", cfg_path,
                        "--profile", site_profile],
                       log=tmp_path / "snakemake.log", env=snakemake_env(pdb_mirror))
    code = run.wait(PIPELINE_TIMEOUT_S)
    out = run.output()
    assert code == 0, out[-6000:]
    assert (work / "results/tables/table1.md").is_file()

    submitted = dict(SUBMITTED.findall(out))
    finished = FINISHED.findall(out)
    rules = {rule for _, rule in finished}
    assert rules >= {"fetch_pdb", "simulate", "reference", "train", "select_best", "phase", "evaluate", "table"}
    known = slurm_jobs()
    for job, rule in finished:
        if rule == "all":  # the target rule runs nothing: Snakemake finishes it itself
            continue
        assert job in submitted, f"job {job} ({rule}) finished without a Slurm job"
        slurm = known[submitted[job]]
        assert slurm["state"] == "COMPLETED", (rule, slurm)
        assert slurm["comment"].startswith(f"rule_{rule}"), (rule, slurm)
    assert len(submitted) == len([r for _, r in finished if r != "all"])


@pytest.mark.slow
def test_preempted_training_resumes_from_its_checkpoint(slurm_cluster, site_profile, pdb_mirror, tmp_path):
    """SIGTERM to the running train job (as at a time limit): it checkpoints, fails, the retry resumes."""
    config = small_test_config()
    # one method, a checkpoint every 2 steps: this test is about signals and resuming
    config["train"].update(methods=[{"name": "xrai", "runs": 1}], checkpoint_every=2)
    config["resources"]["train"]["gpu"] = 1  # schedules on the cluster's fake GPU
    cfg_path = tmp_path / "preempt.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    protein, size = config["proteins"][0], config["simulation"]["train_sizes"][0]
    run_dir = Path("results/reconstructions") / protein / str(size) / "xrai" / "run0"
    work = tmp_path / "work"
    target = run_dir / "intensity.h5"

    run = SnakemakeRun(["-s", REPO / "Snakefile", "--directory", work, "--configfile", cfg_path,
                        "--profile", site_profile, target],
                       log=tmp_path / "snakemake.log", env=snakemake_env(pdb_mirror))
    deadline = time.monotonic() + PREEMPTION_TIMEOUT_S
    checkpoint = work / run_dir / "checkpoint.pt"
    train_job = None
    try:
        # Wait for the train job to run and write its first checkpoint, then signal it.
        while not checkpoint.exists():
            assert run.proc.poll() is None, "snakemake ended before training checkpointed:\n" + run.output()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint in time:\n" + run.output()[-4000:]
            time.sleep(0.2)
        running = [j for j, info in slurm_jobs().items()
                   if info["state"] == "RUNNING" and info["comment"].startswith("rule_train_")]
        assert len(running) == 1, slurm_jobs()
        train_job = running[0]
        cancel = sh("scancel", "--signal=TERM", train_job)
        assert cancel.returncode == 0, cancel.stderr
        job_info = sh("scontrol", "show", "job", train_job).stdout
        assert re.search(r"TresPerJob=\S*gpu:1", job_info), job_info
    finally:
        if train_job is None:
            run.stop()
    code = run.wait(max(deadline - time.monotonic(), 1))
    out = run.output()
    assert code == 0, out[-6000:]
    assert (work / target).is_file()

    # Two Slurm jobs for the one train job: the first failed after SIGTERM, the retry completed.
    train_ids = slurm_job_ids_by_rule(out)["train"]
    assert len(train_ids) == 2 and train_ids[0] == train_job, train_ids
    states = slurm_jobs()
    assert [states[j]["state"] for j in train_ids] == ["FAILED", "COMPLETED"]
    # The first attempt checkpointed on SIGTERM (its Slurm log is kept because it failed) ...
    first_log = next((work / ".snakemake/slurm_logs/rule_train").glob(f"*/{train_ids[0]}.log")).read_text()
    stopped = STOPPED.search(first_log)
    assert stopped, first_log[-3000:]
    total = config["train"]["steps"]
    assert 0 < int(stopped.group(1)) < total and int(stopped.group(2)) == total
    # ... and the retry (Snakemake rewrites the rule's log for it) resumed there instead of starting over.
    log = (work / "results/logs/train" / protein / str(size) / "xrai/run0.log").read_text()
    resumed = RESUMED.search(log)
    assert resumed and int(resumed.group(1)) == int(stopped.group(1)), log[-3000:]
    assert f"training done at step {total}" in log
