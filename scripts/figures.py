"""Rule figures_protein: densities, FSC, training curves and pose errors for one protein."""
from pathlib import Path

from xrai.cli import run_from_snakemake

run_from_snakemake(snakemake, "figures", [  # noqa: F821
    "--kind", "protein",
    "--metrics", *snakemake.input.metrics,  # noqa: F821
    "--out-dir", Path(snakemake.output.densities).parent,  # noqa: F821
])
