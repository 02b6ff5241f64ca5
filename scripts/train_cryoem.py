"""Rule train_cryoem: xrai train on a RELION particle set for one (protein, size, method, run)."""
from pathlib import Path

from xrai.cli import run_from_snakemake

wc = snakemake.wildcards  # noqa: F821
run_from_snakemake(snakemake, "train", [  # noqa: F821
    "--method", wc.method,
    "--run", wc.run,
    "--train-data", snakemake.input.train,  # noqa: F821
    "--test-data", snakemake.input.test,  # noqa: F821
    "--out-dir", Path(snakemake.output.volume).parent,  # noqa: F821
])
