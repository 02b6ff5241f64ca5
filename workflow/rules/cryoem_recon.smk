# Cryo-EM reconstruction, evaluation and tables (defined for cryo-EM configs only, so that the
# X-ray rule graph is unchanged). Run 0 of each method is evaluated.

if modality(config) == "cryoem" and METHODS:

    ruleorder: evaluate_cryoem > evaluate
    ruleorder: train_cryoem > train  # the poses files have the same paths in both modalities

    rule train_cryoem:
        """One cryo-EM reconstruction: the fast default (xrai), the known-pose Wiener bound, cryoAI or cryoPoseNet."""
        input:
            train=f"{RES}/datasets/{{protein}}/train_{{size}}.star",
            test=f"{RES}/datasets/{{protein}}/test_{TEST_SIZE}.star",
        output:
            volume=f"{RES}/reconstructions/{{protein}}/{{size}}/{{method}}/run{{run}}/volume.mrc",
            poses_train=f"{RES}/reconstructions/{{protein}}/{{size}}/{{method}}/run{{run}}/poses_train.h5",
            poses_test=f"{RES}/reconstructions/{{protein}}/{{size}}/{{method}}/run{{run}}/poses_test.h5",
        params:
            config=config_keys("cryoem", "protein", "train"),
        log:
            f"{RES}/logs/train_cryoem/{{protein}}/{{size}}/{{method}}/run{{run}}.log",
        benchmark:
            f"{RES}/benchmarks/train_cryoem/{{protein}}/{{size}}/{{method}}/run{{run}}.tsv"
        wildcard_constraints:
            method="xrai|known-pose|xrai-known-pose|cryoai|cryoposenet",
        conda:
            "../../envs/xrai.yaml"
        threads: rule_threads("train")
        resources:
            **rule_resources("train"),
        script:
            "../../scripts/train.py"

    rule evaluate_cryoem:
        """FSC (0.5 and 0.143) against the reference potential, rotation and shift errors -> metrics.json."""
        input:
            volume=f"{RES}/reconstructions/{{protein}}/{{size}}/{{method}}/run0/volume.mrc",
            reference=f"{RES}/reference/{{protein}}/potential.mrc",
            train=f"{RES}/datasets/{{protein}}/train_{{size}}.star",
            test=f"{RES}/datasets/{{protein}}/test_{TEST_SIZE}.star",
        output:
            metrics=f"{RES}/metrics/{{protein}}/{{size}}/{{method}}/metrics.json",
            aligned=f"{RES}/metrics/{{protein}}/{{size}}/{{method}}/aligned_volume.mrc",
        params:
            config=config_keys("evaluation"),
        log:
            f"{RES}/logs/evaluate_cryoem/{{protein}}/{{size}}/{{method}}.log",
        benchmark:
            f"{RES}/benchmarks/evaluate_cryoem/{{protein}}/{{size}}/{{method}}.tsv"
        conda:
            "../../envs/xrai.yaml"
        threads: 1
        resources:
            **rule_resources("evaluate"),
        script:
            "../../scripts/evaluate_cryoem.py"

    rule table_cryoem:
        """The cryoPoseNet- and cryoAI-style tables from every cryo-EM metrics.json."""
        input:
            metrics=expand(
                f"{RES}/metrics/{{protein}}/{{size}}/{{method}}/metrics.json",
                protein=PROTEINS,
                size=TRAIN_SIZES,
                method=METHODS,
            ),
        output:
            md=report(
                f"{RES}/tables/cryoem_table.md",
                caption="../report/cryoem_table.rst",
                category="Cryo-EM tables",
            ),
            csv=f"{RES}/tables/cryoem_table.csv",
        log:
            f"{RES}/logs/table_cryoem.log",
        conda:
            "../../envs/xrai.yaml"
        resources:
            **rule_resources("report"),
        script:
            "../../scripts/table_cryoem.py"
