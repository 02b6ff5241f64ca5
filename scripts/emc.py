"""Rule emc: xrai emc for one (protein, size, run)."""
from pathlib import Path

from xrai.cli import run_from_snakemake

run_from_snakemake(snakemake, "emc", [  # noqa: F821
    "--run", snakemake.wildcards.run,  # noqa: F821
    "--train-data", snakemake.input.train,  # noqa: F821
    "--test-data", snakemake.input.test,  # noqa: F821
    "--out-dir", Path(snakemake.output.amplitude).parent,  # noqa: F821
])
