"""Rule evaluate: xrai evaluate -> metrics.json."""
from xrai.cli import run_from_snakemake

i = snakemake.input  # noqa: F821
wc = snakemake.wildcards  # noqa: F821
run_from_snakemake(snakemake, "evaluate", [  # noqa: F821
    "--protein", wc.protein, "--size", wc.size, "--method", wc.method,
    "--density", i.density,
    "--best", i.best,
    "--reference", i.reference,
    "--reference-intensity", i.reference_intensity,
    "--train-data", i.train,
    "--test-data", i.test,
    "--benchmarks", snakemake.config.get("_benchmarks_dir", "results/benchmarks"),  # noqa: F821
    "--out", snakemake.output.metrics,  # noqa: F821
])
