# Helpers shared by every rule: config validation, wildcards, output paths.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from xrai.config import method_runs, modality, protein_entries, size_label, validate_config  # noqa: E402
from xrai.errors import XraiError  # noqa: E402

try:
    validate_config(config)
except XraiError as exc:
    raise WorkflowError(f"invalid config: {exc}") from None

PROTEINS = list(protein_entries(config))
TRAIN_SIZES = [int(n) for n in config["simulation"]["train_sizes"]]
TEST_SIZE = int(config["simulation"]["test_size"])
METHOD_RUNS = method_runs(config)
METHODS = list(METHOD_RUNS)
RES = "results"


wildcard_constraints:
    protein="[A-Za-z0-9][A-Za-z0-9_.-]*",
    size=r"\d+",
    split="train|test",
    method="xrai|xrai-paper|known-pose|xrai-known-pose|emc",
    run=r"\d+",


def rule_resources(rule_name):
    """Declared resources of a rule, from config['resources'][rule_name]."""
    res = dict(config.get("resources", {}).get(rule_name, {}))
    res.setdefault("mem_mb", 2000)
    res.setdefault("runtime", 30)
    res.setdefault("gpu", 0)
    return res


def rule_threads(rule_name):
    """CPU threads of a heavy rule: its cpus_per_task, capped by the cores given to Snakemake."""
    want = int(config.get("resources", {}).get(rule_name, {}).get("cpus_per_task", 2))
    # workflow.cores raises when no --cores is given (--profile slurm): jobs get cpus_per_task there.
    cores = workflow._cores
    return min(want, cores) if isinstance(cores, int) else want


def dataset(protein, split, size):
    return f"{RES}/datasets/{protein}/{split}_{size}.h5"


def run_dir(protein, size, method, run):
    return f"{RES}/reconstructions/{protein}/{size}/{method}/run{run}"


def run_outputs(wildcards):
    """Volumes (intensity.h5) of every run of a (protein, size, method)."""
    n = METHOD_RUNS[wildcards.method]
    return [
        f"{run_dir(wildcards.protein, wildcards.size, wildcards.method, k)}/intensity.h5"
        for k in range(n)
    ]


def cryoem_outputs():
    """A cryo-EM config's targets: every particle set (RELION STAR + mrcs) and the reference potential."""
    stars = expand(f"{RES}/datasets/{{protein}}/train_{{size}}.star", protein=PROTEINS, size=TRAIN_SIZES)
    stars += expand(f"{RES}/datasets/{{protein}}/test_{TEST_SIZE}.star", protein=PROTEINS)
    outputs = stars + expand(f"{RES}/reference/{{protein}}/potential.mrc", protein=PROTEINS)
    if METHODS:  # with a train section: reconstructions, metrics and the tables (cryoem_recon.smk)
        outputs.append(f"{RES}/tables/cryoem_table.md")
    return outputs


def final_outputs():
    if modality(config) == "cryoem":  # training on cryo-EM data is the next step
        return cryoem_outputs()
    metrics = expand(
        f"{RES}/metrics/{{protein}}/{{size}}/{{method}}/metrics.json",
        protein=PROTEINS,
        size=TRAIN_SIZES,
        method=METHODS,
    )
    figures = expand(f"{RES}/figures/{{protein}}/densities.png", protein=PROTEINS)
    figures += expand(f"{RES}/figures/{{protein}}/{{size}}/images.png", protein=PROTEINS, size=TRAIN_SIZES)
    return metrics + [f"{RES}/tables/table1.md"] + figures
