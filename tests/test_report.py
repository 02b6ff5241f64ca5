"""Table 1: rows, bold best values, n/a for non-applicable metrics, formats."""

import json

import pytest

from xrai.cli import main
from xrai.report.table import format_time, load_rows, table_latex, table_markdown


def _metrics(tmp_path, protein, size, method, res, train, test, time_s):
    d = tmp_path / protein / str(size) / method
    d.mkdir(parents=True)
    pose = lambda v: None if v is None else {"median_deg": v, "mse_deg2": (2 * v) ** 2}  # noqa: E731
    (d / "metrics.json").write_text(json.dumps({
        "protein": protein, "size": size, "method": method, "resolution_px": res, "resolution_A": res * 4,
        "pose_error_train": pose(train), "pose_error_test": pose(test), "time_s": {"total": time_s},
    }))
    return str(d / "metrics.json")


@pytest.fixture
def metric_files(tmp_path):
    return [
        _metrics(tmp_path, "2CEX_A", 50000, "known-pose", 3.1, None, None, 600),
        _metrics(tmp_path, "2CEX_A", 50000, "xrai", 4.5, 1.5, 1.6, 29760),
        _metrics(tmp_path, "2CEX_A", 500000, "xrai", 4.2, 1.9, 1.4, 29700),
        _metrics(tmp_path, "1O9K", 50000, "xrai", 4.7, 1.5, 1.5, 3600),
    ]


def test_rows_sorted_and_complete(metric_files):
    rows = load_rows(metric_files)
    assert [(r.protein, r.size, r.method) for r in rows] == [
        ("1O9K", 50000, "xrai"), ("2CEX_A", 50000, "xrai"), ("2CEX_A", 50000, "known-pose"),
        ("2CEX_A", 500000, "xrai")]
    assert rows[1].train_rmse == pytest.approx(3.0)


def test_markdown_bold_best_per_protein_and_na(metric_files):
    md = table_markdown(load_rows(metric_files))
    lines = [line for line in md.splitlines() if line.startswith("| 2CEX_A")]
    assert len(lines) == 3
    known = next(line for line in lines if "Known poses" in line)
    assert "**3.10**" in known and known.count("n/a") == 2      # best resolution; no poses
    assert "**1.5** / 3.0" in lines[0]                          # best train median of 2CEX_A
    assert "**1.4** / 2.8" in lines[2]                          # best test median of 2CEX_A
    assert "| 1O9K (Train: 50K) | X-RAI | 1:00h | **4.70** |" in md


def test_latex_escapes_and_bold(metric_files):
    tex = table_latex(load_rows(metric_files))
    assert r"2CEX\_A (Train: 500K)" in tex and r"\textbf{3.10}" in tex and r"\toprule" in tex


def test_format_time():
    assert format_time(29760) == "8:16h" and format_time(420) == "0:07h" and format_time(None) == "n/a"


def test_table_cli(metric_files, tmp_path):
    out = tmp_path / "t"
    code = main(["table", "--metrics", *metric_files, "--csv", str(out / "t.csv"),
                 "--md", str(out / "t.md"), "--tex", str(out / "t.tex")])
    assert code == 0
    assert (out / "t.csv").read_text().count("\n") == 5
    assert "X-RAI" in (out / "t.md").read_text()


def test_table_cli_missing_file_is_one_line_error(tmp_path, capsys):
    code = main(["table", "--metrics", str(tmp_path / "nope.json"), "--csv", "a", "--md", "b", "--tex", "c"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.json" in err[0]


def test_photon_curve_reads_each_proteins_photons(tmp_path):
    """``xrai figures --kind photon-curve``: one point per reconstruction, at the mean photons per
    pattern of its own training set, with its metrics; PNG and PDF written."""
    import numpy as np

    from xrai.data.hdf5 import write_dataset
    from xrai.report.figures import load_reconstructions, photon_curve_points

    results = tmp_path / "results"
    paths = []
    for protein, photons, median in (("P_low", 40.0, 60.0), ("P_high", 4000.0, 1.5)):
        images = np.zeros((6, 4, 4), dtype=np.float32)
        images[:, 0, 0] = photons - 1
        images[:, 2, 3] = 1  # totals of exactly `photons`
        d = results / "datasets" / protein
        d.mkdir(parents=True)
        write_dataset(d / "train_6.h5", images, np.tile([1.0, 0, 0, 0], (6, 1)), np.zeros((4, 4, 3), np.float32))
        for method, test in (("xrai", {"median_deg": median}), ("xrai-known-pose", None)):
            m = results / "metrics" / protein / "6" / method / "metrics.json"
            m.parent.mkdir(parents=True)
            m.write_text(json.dumps({"protein": protein, "size": 6, "method": method, "pose_error_test": test,
                                     "resolution_A": 10.0, "amplitude_correlation": {"mean": 0.5}}))
            paths.append(str(m))
    points = photon_curve_points(load_reconstructions(paths))
    got = {(p["protein"], p["method"]): (p["photons"], p["median_deg"]) for p in points}
    assert got == {("P_low", "xrai"): (40.0, 60.0), ("P_low", "xrai-known-pose"): (40.0, None),
                   ("P_high", "xrai"): (4000.0, 1.5), ("P_high", "xrai-known-pose"): (4000.0, None)}
    out = tmp_path / "figures"
    assert main(["figures", "--kind", "photon-curve", "--metrics", *paths, "--out-dir", str(out)]) == 0
    assert (out / "photon_curve.png").stat().st_size > 0 and (out / "photon_curve.pdf").stat().st_size > 0
