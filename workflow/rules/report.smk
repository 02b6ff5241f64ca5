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


rule figures_protein:
    """Per protein: densities beside the reference, FSC curves, training curves, pose-error histograms."""
    input:
        metrics=lambda wc: expand(
            f"{RES}/metrics/{wc.protein}/{{size}}/{{method}}/metrics.json",
            size=TRAIN_SIZES,
            method=METHODS,
        ),
        aligned=lambda wc: expand(
            f"{RES}/metrics/{wc.protein}/{{size}}/{{method}}/aligned_density.mrc",
            size=TRAIN_SIZES,
            method=METHODS,
        ),
        reference=f"{RES}/reference/{{protein}}/density.mrc",
    output:
        densities=report(
            f"{RES}/figures/{{protein}}/densities.png",
            caption="../report/densities.rst",
            category="{protein}",
            subcategory="All sizes",
        ),
        fsc=report(
            f"{RES}/figures/{{protein}}/fsc.png",
            caption="../report/fsc.rst",
            category="{protein}",
            subcategory="All sizes",
        ),
        curves=report(
            f"{RES}/figures/{{protein}}/training_curves.png",
            caption="../report/training_curves.rst",
            category="{protein}",
            subcategory="All sizes",
        ),
        poses=report(
            f"{RES}/figures/{{protein}}/pose_errors.png",
            caption="../report/pose_errors.rst",
            category="{protein}",
            subcategory="All sizes",
        ),
        pdfs=multiext(
            f"{RES}/figures/{{protein}}/",
            "densities.pdf",
            "fsc.pdf",
            "training_curves.pdf",
            "pose_errors.pdf",
        ),
    log:
        f"{RES}/logs/figures/{{protein}}.log",
    conda:
        "../../envs/xrai.yaml"
    resources:
        **rule_resources("report"),
    script:
        "../../scripts/figures.py"


rule figures_images:
    """Per protein and size: input images beside the decoder's output for the predicted pose (Figure 1)."""
    input:
        metrics=lambda wc: expand(
            f"{RES}/metrics/{wc.protein}/{wc.size}/{{method}}/metrics.json",
            method=METHODS,
        ),
    output:
        png=report(
            f"{RES}/figures/{{protein}}/{{size}}/images.png",
            caption="../report/images.rst",
            category="{protein}",
            subcategory="Train size {size}",
        ),
        pdf=f"{RES}/figures/{{protein}}/{{size}}/images.pdf",
    log:
        f"{RES}/logs/figures/{{protein}}_{{size}}_images.log",
    conda:
        "../../envs/xrai.yaml"
    resources:
        **rule_resources("report"),
    script:
        "../../scripts/figures_images.py"


rule photon_curve:
    """X-ray proteins with their own photon statistics: pose error and resolution against photons per pattern."""
    input:
        metrics=expand(
            f"{RES}/metrics/{{protein}}/{{size}}/{{method}}/metrics.json",
            protein=PROTEINS,
            size=TRAIN_SIZES,
            method=METHODS,
        ),
        train=expand(dataset("{protein}", "train", "{size}"), protein=PROTEINS, size=TRAIN_SIZES),
    output:
        png=report(
            f"{RES}/figures/photon_curve.png",
            caption="../report/photon_curve.rst",
            category="Photon curve",
        ),
        pdf=f"{RES}/figures/photon_curve.pdf",
    log:
        f"{RES}/logs/figures/photon_curve.log",
    conda:
        "../../envs/xrai.yaml"
    resources:
        **rule_resources("report"),
    script:
        "../../scripts/figures_photon_curve.py"
