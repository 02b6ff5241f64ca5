"""Rule reference: xrai reference for one protein."""
from xrai.cli import run_from_snakemake

run_from_snakemake(snakemake, "reference", [  # noqa: F821
    "--structure", snakemake.input.cif,  # noqa: F821
    "--density", snakemake.output.density,  # noqa: F821
    "--intensity", snakemake.output.intensity,  # noqa: F821
])
