rule table:
    """The paper's Table 1 from every metrics.json."""
    input:
        metrics=expand(
            f"{RES}/metrics/{{protein}}/{{size}}/{{method}}/metrics.json",
            protein=PROTEINS,
            size=TRAIN_SIZES,
            method=METHODS,
        ),
    output:
        csv=f"{RES}/tables/table1.csv",
        md=report(
            f"{RES}/tables/table1.md",
            caption="../report/table1.rst",
            category="Table 1",
        ),
        tex=f"{RES}/tables/table1.tex",
    log:
        f"{RES}/logs/table.log",
    conda:
        "../../envs/xrai.yaml"
    resources:
        **rule_resources("report"),
    script:
        "../../scripts/table.py"


rule figures:
    """Figures for the report: densities and FSC, training curves, pose errors, images vs. decoder."""
    input:
        metrics=expand(
            f"{RES}/metrics/{{protein}}/{{size}}/{{method}}/metrics.json",
            protein=PROTEINS,
            size=TRAIN_SIZES,
            method=METHODS,
        ),
    output:
        done=f"{RES}/figures/.done",
    log:
        f"{RES}/logs/figures.log",
    conda:
        "../../envs/xrai.yaml"
    resources:
        **rule_resources("report"),
    script:
        "../../scripts/figures.py"
