"""Rule potential: xrai potential for one protein."""
from xrai.cli import run_from_snakemake

run_from_snakemake(snakemake, "potential", [  # noqa: F821
    "--structure", snakemake.input.cif,  # noqa: F821
    "--protein", snakemake.wildcards.protein,  # noqa: F821
    "--out", snakemake.output.mrc,  # noqa: F821
])
