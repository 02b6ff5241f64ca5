"""Rule fetch_pdb: xrai fetch for one protein."""
from xrai.cli import run_from_snakemake

run_from_snakemake(snakemake, "fetch", [  # noqa: F821
    "--protein", snakemake.wildcards.protein,  # noqa: F821
    "--out", snakemake.output.cif,  # noqa: F821
    "--summary", snakemake.output.summary,  # noqa: F821
])
