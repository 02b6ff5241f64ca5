rule phase:
    """Phase the best run's amplitude volume with ER/HIO + shrinkwrap into an electron density."""
    input:
        best=f"{RES}/reconstructions/{{protein}}/{{size}}/{{method}}/best.json",
        amplitudes=run_outputs,
    output:
        density=f"{RES}/phased/{{protein}}/{{size}}/{{method}}/density.mrc",
        history=f"{RES}/phased/{{protein}}/{{size}}/{{method}}/phasing.json",
    params:
        config=config_keys("phasing"),
    log:
        f"{RES}/logs/phase/{{protein}}/{{size}}/{{method}}.log",
    benchmark:
        f"{RES}/benchmarks/phase/{{protein}}/{{size}}/{{method}}.tsv"
    conda:
        "../../envs/xrai.yaml"
    threads: rule_threads("phase")
    resources:
        **rule_resources("phase"),
    script:
        "../../scripts/phase.py"
