"""Bad data, stale checkpoints, full disks, bad YAML and bare CLI help get plain answers (issue 18)."""

from __future__ import annotations

import argparse
import copy
import errno
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from xrai.cli import COMMANDS, build_parser, main
from xrai.errors import XraiError

REPO = Path(__file__).resolve().parents[1]
TINY = {"encoder": {"channels": [4, 8, 8, 8, 8], "mlp": [16]},
        "decoder": {"width": 16, "envelope_layers": 1, "modulant_layers": 1}}


# --------------------------------------------------------------------------- dataset sanity


def _edited_copy(src: Path, dest: Path, images=None, drop_scale: bool = False, attrs: dict | None = None) -> Path:
    shutil.copy(src, dest)
    with h5py.File(dest, "r+") as f:
        if images is not None:
            f["images"][...] = images(f["images"][...])
        if drop_scale:
            del f["scale"]
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
    return dest


def test_zeroed_constant_or_rescaled_images_are_refused_noisy_ones_pass(test_scale_data, tmp_path):
    from xrai.data.hdf5 import DiffractionDataset

    src = test_scale_data["train"]
    DiffractionDataset(src)  # the simulator's own file passes
    zeros = _edited_copy(src, tmp_path / "zeros.h5", np.zeros_like)
    with pytest.raises(XraiError, match=rf"^{zeros}: every image checked .* is all zero"):
        DiffractionDataset(zeros)
    flat = _edited_copy(src, tmp_path / "flat.h5", lambda x: np.full_like(x, 7.0))
    with pytest.raises(XraiError, match=rf"^{flat}: .* one constant value 7"):
        DiffractionDataset(flat)
    half = _edited_copy(src, tmp_path / "half.h5", lambda x: x * 0.5)
    with pytest.raises(XraiError, match=rf"^{half}: image 0 holds 1\.?\d* ?\S* photons where its scale .* imply"):
        DiffractionDataset(half)
    # no per-image scale (files of other tools): totals are not checked, zeros still are
    DiffractionDataset(_edited_copy(src, tmp_path / "half_noscale.h5", lambda x: x * 0.5, drop_scale=True))
    with pytest.raises(XraiError, match="all zero"):
        DiffractionDataset(_edited_copy(src, tmp_path / "zeros_noscale.h5", np.zeros_like, drop_scale=True))
    # a background on top of the scaled patterns: totals are no longer the scale's
    background = '{"min_total_intensity": 20000, "poisson_noise": false, "background_photons": 50.0}'
    DiffractionDataset(_edited_copy(src, tmp_path / "bg.h5", lambda x: x + 50.0 / x[0].size,
                                    attrs={"scaling": background}))

    # Poisson noise stays within the tolerance of the totals; the same file zeroed does not pass
    from xrai.xray.simulate import simulate_dataset

    cfg = copy.deepcopy(test_scale_data["cfg"])
    cfg["simulation"].update(poisson_noise=True, min_total_intensity=2000)
    out = tmp_path / "noisy.h5"
    simulate_dataset(cfg, test_scale_data["structure"], "train", 64, out)
    with h5py.File(out) as f:
        totals = f["images"][...].sum(axis=(1, 2))
    assert np.abs(totals - 2000).max() > 5  # the noise is there...
    DiffractionDataset(out)  # ...and within the Poisson tolerance
    with pytest.raises(XraiError, match="all zero"):
        DiffractionDataset(_edited_copy(out, tmp_path / "noisy_zeros.h5", np.zeros_like))


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_of_another_dataset_or_config_starts_afresh(test_scale_data, tmp_path):
    from xrai.xray.simulate import simulate_dataset

    data = test_scale_data
    cfg = copy.deepcopy(data["cfg"])
    cfg["train"].update(steps=2, batch_size=16, eval_images=16, log_every=1, device="cpu", **copy.deepcopy(TINY))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    other_cfg = copy.deepcopy(cfg)
    other_cfg["simulation"]["seed"] = 5
    other = tmp_path / "train_other.h5"  # same size and shape, other images
    simulate_dataset(other_cfg, data["structure"], "train", 2048, other)
    out, log = tmp_path / "run", tmp_path / "train.log"

    def train(train_data: Path, config: Path = config) -> str:
        log.write_text("")
        assert main(["train", "--config", str(config), "--method", "known-pose", "--train-data", str(train_data),
                     "--test-data", str(data["test"]), "--out-dir", str(out), f"--log={log}"]) == 0
        return log.read_text()

    assert "starting afresh" not in train(data["train"])
    text = train(other)
    assert "written for another train dataset (its contents differ); starting afresh" in text
    assert "resumed from" not in text
    cfg["train"]["grad_clip"] = 0.5
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert "written with other config values (train.grad_clip 1.0 -> 0.5); starting afresh" in train(other)
    assert "resumed from" in train(other)  # nothing changed: resumes (at the last step)


# --------------------------------------------------------------------------- write failures

_FULL_DISK = r"""
import resource, signal, sys
import numpy as np, torch
from xrai.errors import XraiError
from xrai.data.hdf5 import write_dataset
from xrai.recon.train import save_checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
label, out = sys.argv[1:]
writers = {
    "checkpoint": lambda: save_checkpoint(f"{out}/checkpoint.pt", {"model": torch.zeros(100_000)}),
    "dataset": lambda: write_dataset(f"{out}/train.h5", np.random.rand(64, 32, 32), np.tile([1., 0, 0, 0], (64, 1)),
                                     np.zeros((32, 32, 3))),
}
try:
    writers[label]()
    print(label, "written")
except XraiError as exc:
    print(label, "XraiError", exc, flush=True)
"""


@pytest.mark.parametrize("label, name", [("checkpoint", "checkpoint.pt"), ("dataset", "train.h5")])
def test_a_full_disk_is_one_line_and_leaves_no_file(tmp_path, label, name):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, label, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=120)
    cause = "file too large (a file size limit was reached)"
    assert f"{label} XraiError cannot write {name} to {tmp_path}: {cause}" in proc.stdout, proc.stderr[-2000:]
    if label == "checkpoint":
        # (HDF5 itself may crash while Python exits after a failed write: not the package's to fix)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one is left


def test_disk_full_errno_is_named(tmp_path, monkeypatch):
    """ENOSPC / EDQUOT / EROFS (which a test cannot make for real) through the same path, patched in the writer."""
    from xrai.io import write_json

    for code, cause in ((errno.ENOSPC, "no space left on the device (disk full)"),
                        (errno.EDQUOT, "disk quota exceeded"), (errno.EROFS, "read-only file system")):
        def fail(self, *args, code=code, **kwargs):
            raise OSError(code, os.strerror(code))

        with monkeypatch.context() as m:
            m.setattr(Path, "write_text", fail)
            with pytest.raises(XraiError, match=rf"^cannot write x\.json to {tmp_path}: {re.escape(cause)}$"):
                write_json(tmp_path / "x.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_output_folder_is_one_line(tmp_path, pdb_mirror, monkeypatch, capsys):
    cfg = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    cfg["structure"]["mirror"] = str(pdb_mirror)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):  # root ignores the mode: make the kernel's answer by hand
            def refuse(*args, **kwargs):
                raise PermissionError(errno.EACCES, "Permission denied", str(folder / "x"))

            monkeypatch.setattr(tempfile, "mkstemp", refuse)
            monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: refuse() if folder in self.parents else None)
        for out in (folder / "2CEX_A.cif", folder / "sub" / "2CEX_A.cif"):
            capsys.readouterr()
            assert main(["fetch", "--config", str(config), "--protein", "2CEX_A", "--out", str(out)]) == 2
            err = [line for line in capsys.readouterr().err.splitlines() if " INFO " not in line]
            assert len(err) == 1 and err[0].startswith("xrai fetch: error: cannot write "), err
            assert str(folder) in err[0] and err[0].endswith("permission denied (the folder is not writable)")
    finally:
        folder.chmod(0o755)


# --------------------------------------------------------------------------- config errors


def test_config_errors_name_file_line_and_column(tmp_path, capsys):
    text = (REPO / "config" / "test.yaml").read_text()
    bad_syntax = tmp_path / "syntax.yaml"
    bad_syntax.write_text(text.replace("  side_m: 0.1", "  side_m: [0.1"))
    line = next(i for i, s in enumerate(text.splitlines(), 1) if s.startswith("  side_m:"))
    assert main(["simulate", "--config", str(bad_syntax), "--plan"]) == 2
    err = capsys.readouterr().err  # YAML finds the problem on the next line, where the list does not go on
    assert f"{bad_syntax}, line {line + 1}, column 13: not valid YAML (while parsing a flow sequence started at " \
           f"line {line}, column 11: expected ',' or ']', but got ':')" in err
    bad_key = tmp_path / "key.yaml"
    bad_key.write_text(text.replace("  side_m: 0.1", "  side_m: 0.1\n  sidem: 0.2"))
    assert main(["simulate", "--config", str(bad_key), "--plan"]) == 2
    assert f"{bad_key}, line {line + 1}, column 3: unknown config key 'detector.sidem'" in capsys.readouterr().err
    bad_value = tmp_path / "value.yaml"
    bad_value.write_text(text.replace("  n_pixels: 32", "  n_pixels: -3"))
    n_line = next(i for i, s in enumerate(text.splitlines(), 1) if s.startswith("  n_pixels:"))
    assert main(["simulate", "--config", str(bad_value), "--plan"]) == 2
    assert f"{bad_value}, line {n_line}, column 3: config key 'detector.n_pixels'" in capsys.readouterr().err


def test_the_workflow_names_the_line_of_a_bad_key(tmp_path):
    text = (REPO / "config" / "test.yaml").read_text()
    bad_key = tmp_path / "key.yaml"
    bad_key.write_text(text.replace("  fsc_cutoff: 0.5", "  fsc_cutof: 0.5"))
    line = next(i for i, s in enumerate(text.splitlines(), 1) if s.startswith("  fsc_cutoff:"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                           "--configfile", str(bad_key)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert f"invalid config: {bad_key}, line {line}, column 3: unknown config key 'evaluation.fsc_cutof'" \
        in proc.stdout + proc.stderr


# --------------------------------------------------------------------------- CLI help


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help_and_the_help_ends_with_an_example(command):
    parser = build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    bare = [a.option_strings for a in sub._actions if a.option_strings and not a.help]
    assert not bare, f"options without help: {bare}"
    last = sub.format_help().rstrip().splitlines()[-1]
    assert last.startswith(f"example: xrai {command} "), last
    # the example parses as this command's arguments
    sub.parse_args(last.removeprefix(f"example: xrai {command} ").split())


# --------------------------------------------------------------------------- structures


def test_a_pdb_file_cut_at_a_line_boundary_is_refused(pdb_mirror, tmp_path):
    from xrai.structure import fetch_structure

    lines = (pdb_mirror / "2cex.pdb").read_text().splitlines(keepends=True)
    last_atom = max(i for i, s in enumerate(lines) if s.startswith("ATOM"))
    cut = tmp_path / "cut.pdb"
    cut.write_text("".join(lines[:last_atom - 40]))  # inside chain B, before its TER and END
    out = (tmp_path / "x.cif", tmp_path / "x.json")
    with pytest.raises(XraiError, match=rf"^{cut}: truncated\? no END record and \d+ atoms .*chain B: 29\d residues "
                                        r"with atoms \+ \d listed as missing \(REMARK 465\) of 306 in SEQRES.*"
                                        r"chain B stops without TER.*structure.allow_partial"):
        fetch_structure({"file": str(cut), "chains": ["A"]}, {}, *out)
    assert not out[0].exists()
    summary = fetch_structure({"file": str(cut), "chains": ["A"]}, {"allow_partial": True}, *out)
    assert summary["n_atoms"] == 2362  # chain A is whole
    fetch_structure({"file": str(pdb_mirror / "2cex.pdb"), "chains": ["A"]}, {}, *out)  # the intact file (END)
