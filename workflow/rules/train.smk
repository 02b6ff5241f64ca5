rule train:
    """One reconstruction run: X-RAI (default), the paper's recipe, or a known-pose bound. Resumable."""
    input:
        train=dataset("{protein}", "train", "{size}"),
        test=dataset("{protein}", "test", TEST_SIZE),
    output:
        intensity=f"{RES}/reconstructions/{{protein}}/{{size}}/{{method}}/run{{run}}/intensity.h5",
        amplitude=f"{RES}/reconstructions/{{protein}}/{{size}}/{{method}}/run{{run}}/amplitude.mrc",
        poses_train=f"{RES}/reconstructions/{{protein}}/{{size}}/{{method}}/run{{run}}/poses_train.h5",
        poses_test=f"{RES}/reconstructions/{{protein}}/{{size}}/{{method}}/run{{run}}/poses_test.h5",
        metrics=f"{RES}/reconstructions/{{protein}}/{{size}}/{{method}}/run{{run}}/metrics.csv",
    params:
        config=config_keys("detector", "beam", "volume", "train", exclude=("train.select_best_by",)),
    log:
        f"{RES}/logs/train/{{protein}}/{{size}}/{{method}}/run{{run}}.log",
    benchmark:
        f"{RES}/benchmarks/train/{{protein}}/{{size}}/{{method}}/run{{run}}.tsv"
    wildcard_constraints:
        method="xrai|xrai-paper|known-pose|xrai-known-pose",
    conda:
        "../../envs/xrai.yaml"
    threads: rule_threads("train")
    resources:
        **rule_resources("train"),
    script:
        "../../scripts/train.py"


rule emc:
    """Non-amortized baseline: expand-maximize-compress on the same data, same outputs as train."""
    input:
        train=dataset("{protein}", "train", "{size}"),
        test=dataset("{protein}", "test", TEST_SIZE),
    output:
        intensity=f"{RES}/reconstructions/{{protein}}/{{size}}/emc/run{{run}}/intensity.h5",
        amplitude=f"{RES}/reconstructions/{{protein}}/{{size}}/emc/run{{run}}/amplitude.mrc",
        poses_train=f"{RES}/reconstructions/{{protein}}/{{size}}/emc/run{{run}}/poses_train.h5",
        poses_test=f"{RES}/reconstructions/{{protein}}/{{size}}/emc/run{{run}}/poses_test.h5",
        metrics=f"{RES}/reconstructions/{{protein}}/{{size}}/emc/run{{run}}/metrics.csv",
    params:
        config=config_keys("detector", "beam", "volume", "emc"),
    log:
        f"{RES}/logs/emc/{{protein}}/{{size}}/run{{run}}.log",
    benchmark:
        f"{RES}/benchmarks/train/{{protein}}/{{size}}/emc/run{{run}}.tsv"
    conda:
        "../../envs/xrai.yaml"
    threads: rule_threads("train")
    resources:
        **rule_resources("train"),
    script:
        "../../scripts/emc.py"


rule select_best:
    """Keep the best of the independent runs by train pose error (appendix A.1)."""
    input:
        amplitudes=run_outputs,
    output:
        best=f"{RES}/reconstructions/{{protein}}/{{size}}/{{method}}/best.json",
    params:
        config=config_keys("train.select_best_by"),
    log:
        f"{RES}/logs/select_best/{{protein}}/{{size}}/{{method}}.log",
    conda:
        "../../envs/xrai.yaml"
    resources:
        **rule_resources("evaluate"),
    script:
        "../../scripts/select_best.py"
