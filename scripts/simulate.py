"""Rule simulate: xrai simulate for one (protein, split, size)."""
from xrai.cli import run_from_snakemake

wc = snakemake.wildcards  # noqa: F821
run_from_snakemake(snakemake, "simulate", [  # noqa: F821
    "--structure", snakemake.input.cif,  # noqa: F821
    "--protein", wc.protein,
    "--split", wc.split,
    "--n-images", wc.size,
    "--out", snakemake.output.h5,  # noqa: F821
])
