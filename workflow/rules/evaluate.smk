rule evaluate:
    """Align to the reference (both hands), FSC at 0.5, pose errors on train and test -> metrics.json."""
    input:
        density=f"{RES}/phased/{{protein}}/{{size}}/{{method}}/density.mrc",
        best=f"{RES}/reconstructions/{{protein}}/{{size}}/{{method}}/best.json",
        amplitudes=run_outputs,
        reference=f"{RES}/reference/{{protein}}/density.mrc",
        reference_intensity=f"{RES}/reference/{{protein}}/intensity.h5",
        train=dataset("{protein}", "train", "{size}"),
        test=dataset("{protein}", "test", TEST_SIZE),
    output:
        metrics=f"{RES}/metrics/{{protein}}/{{size}}/{{method}}/metrics.json",
        aligned=f"{RES}/metrics/{{protein}}/{{size}}/{{method}}/aligned_density.mrc",
    params:
        config=config_keys("evaluation"),
    log:
        f"{RES}/logs/evaluate/{{protein}}/{{size}}/{{method}}.log",
    benchmark:
        f"{RES}/benchmarks/evaluate/{{protein}}/{{size}}/{{method}}.tsv"
    conda:
        "../../envs/xrai.yaml"
    threads: rule_threads("evaluate")
    resources:
        **rule_resources("evaluate"),
    script:
        "../../scripts/evaluate.py"
