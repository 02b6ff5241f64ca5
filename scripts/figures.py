"""Rule figures: every figure of the report."""
from pathlib import Path

from xrai.cli import run_from_snakemake

run_from_snakemake(snakemake, "figures", [  # noqa: F821
    "--metrics", *snakemake.input.metrics,  # noqa: F821
    "--out-dir", Path(snakemake.output.done).parent,  # noqa: F821
    "--done", snakemake.output.done,  # noqa: F821
])
