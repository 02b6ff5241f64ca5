"""Rule select_best: keep the best run by train pose error."""
from pathlib import Path

from xrai.cli import run_from_snakemake

run_from_snakemake(snakemake, "select-best", [  # noqa: F821
    "--run-dirs", *[Path(p).parent for p in snakemake.input.amplitudes],  # noqa: F821
    "--out", snakemake.output.best,  # noqa: F821
])
