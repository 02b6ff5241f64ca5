"""Rule phase: xrai phase on the best run's amplitude volume."""
from xrai.cli import run_from_snakemake

run_from_snakemake(snakemake, "phase", [  # noqa: F821
    "--best", snakemake.input.best,  # noqa: F821
    "--out", snakemake.output.density,  # noqa: F821
    "--history", snakemake.output.history,  # noqa: F821
])
