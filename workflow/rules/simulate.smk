rule simulate:
    """Simulate one SPI diffraction dataset (train or test split) to HDF5, streamed in batches."""
    input:
        cif=f"{RES}/structures/{{protein}}.cif",
    output:
        h5=f"{RES}/datasets/{{protein}}/{{split}}_{{size}}.h5",
    params:
        config=config_keys(
            "detector", "beam", "simulation", "split_seed",
            exclude=("simulation.train_sizes", "simulation.test_size", "simulation.seed", "simulation.test_seed"),
        ),
    log:
        f"{RES}/logs/simulate/{{protein}}/{{split}}_{{size}}.log",
    benchmark:
        f"{RES}/benchmarks/simulate/{{protein}}/{{split}}_{{size}}.tsv"
    conda:
        "../../envs/xrai.yaml"
    threads: rule_threads("simulate")
    resources:
        **rule_resources("simulate"),
    script:
        "../../scripts/simulate.py"


rule reference:
    """Ground truth: real-space electron density and true intensity volume on the reconstruction grid."""
    input:
        cif=f"{RES}/structures/{{protein}}.cif",
    output:
        density=f"{RES}/reference/{{protein}}/density.mrc",
        intensity=f"{RES}/reference/{{protein}}/intensity.h5",
    params:
        config=config_keys("detector", "beam", "volume"),
    log:
        f"{RES}/logs/reference/{{protein}}.log",
    conda:
        "../../envs/xrai.yaml"
    threads: rule_threads("reference")
    resources:
        **rule_resources("reference"),
    script:
        "../../scripts/reference.py"
