"""The X-RAI paper's Table 1, rebuilt from every ``metrics.json`` of a pipeline run.

Rows are protein x training size x method; columns are Time, Resolution (pixels),
Train Error (Med/MSE) and Test Error (Med/MSE), as in the paper. Only methods that
ran appear; a metric that does not apply (pose errors of the known-pose bound) is
shown as "n/a", never guessed.

Usage::

    from xrai.report.table import load_rows, table_markdown
    rows = load_rows(["results/metrics/2CEX_A/16384/xrai/metrics.json"])
    print(table_markdown(rows))
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from xrai.config import size_label
from xrai.io import atomic_path, read_json

logger = logging.getLogger(__name__)

#: Display names of the methods, in table order.
METHOD_NAMES = {
    "xrai": "X-RAI",
    "xrai-paper": "X-RAI (paper recipe)",
    "emc": "EMC",
    "known-pose": "Known poses, FourierNet (bound)",
    "xrai-known-pose": "Known poses, merged volume (bound)",
}


@dataclass
class Row:
    """One line of Table 1."""

    protein: str
    size: int
    method: str
    time_s: float | None
    resolution_px: float | None
    resolution_A: float | None
    train_median: float | None
    train_rmse: float | None
    test_median: float | None
    test_rmse: float | None

    @property
    def dataset(self) -> str:
        return f"{self.protein} (Train: {size_label(self.size)})"


def _pose(summary: dict | None) -> tuple[float | None, float | None]:
    if not summary:
        return None, None
    mse = summary.get("mse_deg2")
    return summary.get("median_deg"), (math.sqrt(mse) if mse is not None else None)


def load_rows(paths: Sequence[str]) -> list[Row]:
    """Read metrics.json files into table rows, sorted by protein, size and method order."""
    rows = []
    for p in paths:
        m = read_json(p)
        tr_med, tr_rmse = _pose(m.get("pose_error_train"))
        te_med, te_rmse = _pose(m.get("pose_error_test"))
        rows.append(Row(
            protein=str(m["protein"]), size=int(m["size"]), method=str(m["method"]),
            time_s=(m.get("time_s") or {}).get("total"),
            resolution_px=m.get("resolution_px"), resolution_A=m.get("resolution_A"),
            train_median=tr_med, train_rmse=tr_rmse, test_median=te_med, test_rmse=te_rmse,
        ))
    order = list(METHOD_NAMES)
    rows.sort(key=lambda r: (r.protein, r.size, order.index(r.method) if r.method in order else 99))
    return rows


def format_time(seconds: float | None) -> str:
    """Seconds as the paper's ``H:MMh`` (``0:07h`` for seven minutes)."""
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    minutes = int(round(seconds / 60))
    return f"{minutes // 60}:{minutes % 60:02d}h"


def _best(rows: list[Row], attr: str) -> dict[str, float]:
    """Lowest value of ``attr`` per protein (ignoring missing values)."""
    best: dict[str, float] = {}
    for r in rows:
        v = getattr(r, attr)
        if v is not None and (r.protein not in best or v < best[r.protein]):
            best[r.protein] = v
    return best


def _cells(rows: list[Row], bold: tuple[str, str]) -> list[list[str]]:
    """Formatted cells; the best resolution and pose medians per protein are wrapped in ``bold``."""
    best = {a: _best(rows, a) for a in ("resolution_px", "train_median", "test_median")}

    def fmt(r: Row, attr: str, digits: int) -> str:
        v = getattr(r, attr)
        if v is None:
            return "n/a"
        s = f"{v:.{digits}f}"
        return f"{bold[0]}{s}{bold[1]}" if best[attr].get(r.protein) == v else s

    def pair(r: Row, med: str, rmse: str) -> str:
        if getattr(r, med) is None:
            return "n/a"
        return f"{fmt(r, med, 1)} / {getattr(r, rmse):.1f}"

    return [[r.dataset, METHOD_NAMES.get(r.method, r.method), format_time(r.time_s),
             fmt(r, "resolution_px", 2), pair(r, "train_median", "train_rmse"),
             pair(r, "test_median", "test_rmse")] for r in rows]


HEADER = ["Dataset", "Method", "Time", "Resolution (pixels) ↓", "Train Error (Med/MSE) ↓", "Test Error (Med/MSE) ↓"]
FOOTNOTE = ("Pose errors in degrees after global alignment with the in-plane π ambiguity folded (appendix A.1); "
            "MSE is given as the root-mean-square error in degrees, the unit of the paper's column. "
            "Resolution: FSC = 0.5 against the reference density, box / shell (Nyquist = 2 px). "
            "Best value per protein in bold. n/a: not applicable (the known-pose bounds have no estimated poses).")


def table_markdown(rows: list[Row]) -> str:
    """Table 1 as GitHub-flavoured Markdown, best values in bold."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(c) + " |" for c in _cells(rows, ("**", "**"))]
    return "\n".join(lines) + f"\n\n{FOOTNOTE}\n"


def table_latex(rows: list[Row]) -> str:
    """Table 1 as a LaTeX ``tabular`` (booktabs), best values in bold."""
    def esc(s: str) -> str:
        return (s.replace("_", r"\_").replace("↓", r"$\downarrow$").replace("π", r"$\pi$"))

    out = [r"\begin{tabular}{llllll}", r"\toprule", " & ".join(esc(h) for h in HEADER) + r" \\", r"\midrule"]
    out += [" & ".join(esc(c) for c in cells) + r" \\" for cells in _cells(rows, (r"\textbf{", "}"))]
    out += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(out)


def table_csv(rows: list[Row]) -> str:
    """Table 1 as CSV with raw numbers (seconds, pixels, Angstrom, degrees)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["protein", "train_size", "method", "time_s", "resolution_px", "resolution_A",
                "train_median_deg", "train_rmse_deg", "test_median_deg", "test_rmse_deg"])
    for r in rows:
        w.writerow([r.protein, r.size, r.method, r.time_s, r.resolution_px, r.resolution_A,
                    r.train_median, r.train_rmse, r.test_median, r.test_rmse])
    return buf.getvalue()


def write_tables(metrics_paths: Sequence[str], csv_path: str, md_path: str, tex_path: str) -> list[Row]:
    """Write Table 1 as CSV, Markdown and LaTeX (atomically); return the rows."""
    rows = load_rows(metrics_paths)
    for path, text in ((csv_path, table_csv(rows)), (md_path, table_markdown(rows)), (tex_path, table_latex(rows))):
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    logger.info("Table 1: %d rows -> %s", len(rows), md_path)
    return rows


def add_table_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics", nargs="+", required=True, help="metrics.json files")
    parser.add_argument("--csv", required=True, metavar="CSV", help="Table 1 as CSV, to write")
    parser.add_argument("--md", required=True, metavar="MD", help="Table 1 as Markdown, to write")
    parser.add_argument("--tex", required=True, metavar="TEX", help="Table 1 as a LaTeX tabular, to write")


def run_table(args: argparse.Namespace) -> None:
    write_tables(args.metrics, args.csv, args.md, args.tex)
