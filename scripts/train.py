"""Rules train and train_cryoem: xrai train for one (protein, size, method, run); the run folder holds the first output."""
from pathlib import Path

from xrai.cli import run_from_snakemake

wc = snakemake.wildcards  # noqa: F821
run_from_snakemake(snakemake, "train", [  # noqa: F821
    "--method", wc.method,
    "--run", wc.run,
    "--protein", wc.protein,
    "--train-data", snakemake.input.train,  # noqa: F821
    "--test-data", snakemake.input.test,  # noqa: F821
    "--out-dir", Path(snakemake.output[0]).parent,  # noqa: F821
])
