"""The cryo-EM tables, in the style of cryoPoseNet's Table 1 and cryoAI's Table 1, from ``metrics.json`` files.

* cryoPoseNet style: one row per (dataset, method): resolution (Å, FSC 0.5), MAE (°, the mean
  rotation error on the held-out images), RMSE (°), time;
* cryoAI style: resolution (px, FSC 0.5), rotation error (median squared Frobenius norm),
  translation error (mean squared L2 norm, px²), time.

The known-pose bound is a row like the others (its pose errors are "true poses"). Missing values
are written as ``–``.

Usage::

    xrai table-cryoem --metrics results/metrics/4AKE/2048/*/metrics.json --out-md t.md --out-csv t.csv
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from xrai.errors import XraiError

logger = logging.getLogger(__name__)

#: method name -> row label
LABELS = {"xrai": "xrai (fast default)", "known-pose": "known-pose bound", "cryoem-known-pose": "known-pose bound",
          "cryoai": "cryoAI", "cryoposenet": "cryoPoseNet"}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table_rows(metrics: list[dict]) -> list[dict]:
    """One row per metrics.json, with both papers' columns (None where not measured)."""
    rows = []
    for m in metrics:
        if m.get("modality") != "cryoem":
            raise XraiError(f"{m.get('run_dir', '?')}: not a cryo-EM metrics.json (modality {m.get('modality')!r})")
        test = m.get("pose_error_test") or {}
        shift = test.get("shift_error") or {}
        res = m["resolution"]
        rows.append({
            "dataset": f"{m['protein']} {m['size']}", "method": LABELS.get(m["method"], m["method"]),
            "resolution_A": res["0.5"]["A"], "resolution_143_A": res["0.143"]["A"], "resolution_px": res["0.5"]["px"],
            "mae_deg": test.get("mae_deg"), "median_deg": test.get("median_deg"), "rmse_deg": test.get("rmse_deg"),
            "rotation_frobenius_sq": test.get("frobenius_sq_median"), "translation_mse_px2": shift.get("mse_px2"),
            "shift_median_A": shift.get("median_A"), "time_min": (m["time_s"]["train"] or 0) / 60 or None,
            "true_poses": not test,
        })
    return rows


def markdown(rows: list[dict]) -> str:
    """Both tables as Markdown."""
    out = ["### cryoPoseNet style (Table 1)", "",
           "| dataset | method | resolution (Å, FSC 0.5) | resolution (Å, FSC 0.143) | MAE (°) | median (°) | RMSE (°) | time (min) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pose = ("true poses", "true poses", "true poses") if r["true_poses"] else (
            _fmt(r["mae_deg"]), _fmt(r["median_deg"]), _fmt(r["rmse_deg"]))
        out.append(f"| {r['dataset']} | {r['method']} | {_fmt(r['resolution_A'])} | {_fmt(r['resolution_143_A'])} | "
                   f"{' | '.join(pose)} | {_fmt(r['time_min'], 1)} |")
    out += ["", "### cryoAI style (Table 1)", "",
            "| dataset | method | resolution (px, FSC 0.5) | rotation error (median ‖R − R̂‖²_F) | translation error (mean px²) | time (min) |",
            "|---|---|---|---|---|---|"]
    for r in rows:
        rot = "true poses" if r["true_poses"] else _fmt(r["rotation_frobenius_sq"], 4)
        tr = "true poses" if r["true_poses"] else _fmt(r["translation_mse_px2"], 3)
        out.append(f"| {r['dataset']} | {r['method']} | {_fmt(r['resolution_px'])} | {rot} | {tr} | "
                   f"{_fmt(r['time_min'], 1)} |")
    return "\n".join(out) + "\n"


def write_tables(metrics_paths: list[str | Path], out_md: str | Path, out_csv: str | Path) -> list[dict]:
    """Read every metrics.json, write the Markdown tables and one CSV (every column), atomically."""
    from xrai.io import atomic_path, read_json, write_csv

    rows = table_rows([read_json(p) for p in metrics_paths])
    with atomic_path(out_md) as tmp:
        Path(tmp).write_text(markdown(rows))
    write_csv(out_csv, rows, list(rows[0]) if rows else ["dataset"])
    logger.info("wrote %s and %s (%d rows)", out_md, out_csv, len(rows))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``xrai table-cryoem``."""
    parser.add_argument("--metrics", nargs="+", required=True, metavar="JSON", help="cryo-EM metrics.json files")
    parser.add_argument("--out-md", required=True, metavar="MD", help="Markdown tables to write")
    parser.add_argument("--out-csv", required=True, metavar="CSV", help="CSV table to write")


def run(args: argparse.Namespace) -> None:
    """``xrai table-cryoem``."""
    write_tables(args.metrics, args.out_md, args.out_csv)
