"""Rule evaluate_cryoem: xrai evaluate-cryoem -> metrics.json."""
from pathlib import Path

from xrai.cli import run_from_snakemake

i = snakemake.input  # noqa: F821
wc = snakemake.wildcards  # noqa: F821
run_from_snakemake(snakemake, "evaluate-cryoem", [  # noqa: F821
    "--protein", wc.protein, "--size", wc.size, "--method", wc.method,
    "--run-dir", Path(i.volume).parent,
    "--reference", i.reference,
    "--train-data", i.train,
    "--test-data", i.test,
    "--out", snakemake.output.metrics,  # noqa: F821
])
