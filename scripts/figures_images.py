"""Rule figures_images: input images beside the decoder's output for one protein and size."""
from pathlib import Path

from xrai.cli import run_from_snakemake

run_from_snakemake(snakemake, "figures", [  # noqa: F821
    "--kind", "images",
    "--metrics", *snakemake.input.metrics,  # noqa: F821
    "--out-dir", Path(snakemake.output.png).parent,  # noqa: F821
])
