rule simulate:
    """Simulate one SPI diffraction dataset (train or test split) to HDF5, streamed in batches."""
    input:
        cif=f"{RES}/structures/{{protein}}.cif",
    output:
        h5=f"{RES}/datasets/{{protein}}/{{split}}_{{size}}.h5",
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
    log:
        f"{RES}/logs/reference/{{protein}}.log",
    conda:
        "../../envs/xrai.yaml"
    threads: rule_threads("reference")
    resources:
        **rule_resources("reference"),
    script:
        "../../scripts/reference.py"
