"""xrai.utils and package set-up: CPU threads, allocator, OpenMP waiting, devices."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from xrai.errors import XraiError
from xrai.utils import pick_device, set_cpu_threads, tune_allocator


def test_import_makes_idle_openmp_threads_sleep_unless_told_otherwise():
    code = "import os, xrai, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, OMP_WAIT_POLICY="ACTIVE"),
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_allocator_tuning_is_accepted_by_glibc():
    assert tune_allocator() is True


def test_threads_follow_the_rule_then_the_affinity(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("XRAI_THREADS", "1")
        assert set_cpu_threads(0) == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("XRAI_THREADS")
        assert set_cpu_threads(0) == len(os.sched_getaffinity(0))
        assert set_cpu_threads(2) == 2
    finally:
        torch.set_num_threads(before)


def test_asking_for_a_missing_gpu_is_a_user_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert pick_device("auto").type == "cpu"
    with pytest.raises(XraiError, match="device: auto or cpu"):
        pick_device("cuda")
