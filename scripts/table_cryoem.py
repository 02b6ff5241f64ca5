"""Rule table_cryoem: xrai table-cryoem -> the cryoPoseNet- and cryoAI-style tables."""
from xrai.cli import run_from_snakemake

run_from_snakemake(snakemake, "table-cryoem", [  # noqa: F821
    "--metrics", *snakemake.input.metrics,  # noqa: F821
    "--out-md", snakemake.output.md,  # noqa: F821
    "--out-csv", snakemake.output.csv,  # noqa: F821
])
