"""Rule table: the paper's Table 1 from every metrics.json."""
from xrai.cli import run_from_snakemake

o = snakemake.output  # noqa: F821
run_from_snakemake(snakemake, "table", [  # noqa: F821
    "--metrics", *snakemake.input.metrics,  # noqa: F821
    "--csv", o.csv, "--md", o.md, "--tex", o.tex,
])
