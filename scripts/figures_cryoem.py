"""Rule figures_cryoem: particle images, FSC, pose errors and density slices for one protein."""
from pathlib import Path

from xrai.cli import run_from_snakemake

run_from_snakemake(snakemake, "figures-cryoem", [  # noqa: F821
    "--metrics", *snakemake.input.metrics,  # noqa: F821
    "--out-dir", Path(snakemake.output.images).parent,  # noqa: F821
])
