"""Rule photon_curve: pose error and resolution against photons per pattern over the config's proteins."""
from pathlib import Path

from xrai.cli import run_from_snakemake

run_from_snakemake(snakemake, "figures", [  # noqa: F821
    "--kind", "photon-curve",
    "--metrics", *snakemake.input.metrics,  # noqa: F821
    "--out-dir", Path(snakemake.output.png).parent,  # noqa: F821
])
