rule fetch_pdb:
    """Fetch a PDB entry (local file, mirror, or RCSB), select chains, write mmCIF + JSON summary."""
    output:
        cif=f"{RES}/structures/{{protein}}.cif",
        summary=f"{RES}/structures/{{protein}}.json",
    params:
        config=config_keys("protein", "structure"),
    log:
        f"{RES}/logs/fetch_pdb/{{protein}}.log",
    conda:
        "../../envs/xrai.yaml"
    resources:
        **rule_resources("fetch_pdb"),
    script:
        "../../scripts/fetch_pdb.py"
