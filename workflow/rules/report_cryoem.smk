# The report's cryo-EM section: per protein, particle images, FSC curves, pose errors and density
# slices (xrai figures-cryoem). Defined for cryo-EM configs with a train section only, like
# cryoem_recon.smk, so that the X-ray rule graph is unchanged. Run 0 of each method is drawn.

if modality(config) == "cryoem" and METHODS:

    rule figures_cryoem:
        """Per protein: test particles (clean, CTF, recorded), FSC, pose-error histograms, density slices."""
        input:
            metrics=lambda wc: expand(
                f"{RES}/metrics/{wc.protein}/{{size}}/{{method}}/metrics.json",
                size=TRAIN_SIZES,
                method=METHODS,
            ),
            aligned=lambda wc: expand(
                f"{RES}/metrics/{wc.protein}/{{size}}/{{method}}/aligned_volume.mrc",
                size=TRAIN_SIZES,
                method=METHODS,
            ),
            poses=lambda wc: expand(
                f"{RES}/reconstructions/{wc.protein}/{{size}}/{{method}}/run0/poses_{{split}}.h5",
                size=TRAIN_SIZES,
                method=METHODS,
                split=("train", "test"),
            ),
            reference=f"{RES}/reference/{{protein}}/potential.mrc",
            train=lambda wc: expand(f"{RES}/datasets/{wc.protein}/train_{{size}}.star", size=TRAIN_SIZES),
            test=f"{RES}/datasets/{{protein}}/test_{TEST_SIZE}.star",
        output:
            images=report(
                f"{RES}/figures/{{protein}}/cryoem_images.png",
                caption="../report/cryoem_images.rst",
                category="{protein}",
                subcategory="Cryo-EM",
            ),
            fsc=report(
                f"{RES}/figures/{{protein}}/cryoem_fsc.png",
                caption="../report/cryoem_fsc.rst",
                category="{protein}",
                subcategory="Cryo-EM",
            ),
            poses=report(
                f"{RES}/figures/{{protein}}/cryoem_pose_errors.png",
                caption="../report/cryoem_pose_errors.rst",
                category="{protein}",
                subcategory="Cryo-EM",
            ),
            densities=report(
                f"{RES}/figures/{{protein}}/cryoem_densities.png",
                caption="../report/cryoem_densities.rst",
                category="{protein}",
                subcategory="Cryo-EM",
            ),
            pdfs=multiext(
                f"{RES}/figures/{{protein}}/",
                "cryoem_images.pdf",
                "cryoem_fsc.pdf",
                "cryoem_pose_errors.pdf",
                "cryoem_densities.pdf",
            ),
        log:
            f"{RES}/logs/figures_cryoem/{{protein}}.log",
        conda:
            "../../envs/xrai.yaml"
        threads: 1
        resources:
            **rule_resources("report"),
        script:
            "../../scripts/figures_cryoem.py"
