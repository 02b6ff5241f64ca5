rule simulate_cryoem:
    """Simulate one cryo-EM particle set (train or test split): RELION 3.1 STAR + .mrcs stacks, streamed."""
    input:
        cif=f"{RES}/structures/{{protein}}.cif",
    output:
        star=f"{RES}/datasets/{{protein}}/{{split}}_{{size}}.star",
    params:
        config=config_keys(
            "cryoem", "protein", "simulation", "split_seed",
            exclude=("simulation.train_sizes", "simulation.test_size", "simulation.seed", "simulation.test_seed"),
        ),
    log:
        f"{RES}/logs/simulate_cryoem/{{protein}}/{{split}}_{{size}}.log",
    benchmark:
        f"{RES}/benchmarks/simulate_cryoem/{{protein}}/{{split}}_{{size}}.tsv"
    conda:
        "../../envs/xrai.yaml"
    threads: rule_threads("simulate")
    resources:
        **rule_resources("simulate"),
    script:
        "../../scripts/simulate_cryoem.py"


rule potential:
    """Cryo-EM ground truth: the electrostatic potential of the atoms on the images' grid (MRC)."""
    input:
        cif=f"{RES}/structures/{{protein}}.cif",
    output:
        mrc=f"{RES}/reference/{{protein}}/potential.mrc",
    params:
        # what the potential reads: not the imaging (CTF, noise, shifts) that only the particle sets see
        config=config_keys("cryoem.box_size", "cryoem.pixel_size_A", "cryoem.bfactor", "protein"),
    log:
        f"{RES}/logs/potential/{{protein}}.log",
    benchmark:
        f"{RES}/benchmarks/potential/{{protein}}.tsv"
    conda:
        "../../envs/xrai.yaml"
    threads: rule_threads("reference")
    resources:
        **rule_resources("reference"),
    script:
        "../../scripts/potential.py"
