# xrai: from a PDB entry to a reconstructed molecule and the X-RAI paper's Table 1.
#   snakemake --cores 2 --configfile config/demo.yaml     (laptop demo)
#   snakemake --profile slurm                             (the paper, on a cluster)

# The paper's setup, unless --configfile names another scale (merging it into config.yaml would
# leave paper-scale keys behind).
if not workflow.overwrite_configfiles:

    configfile: f"{workflow.basedir}/config.yaml"



report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/fetch.smk"
include: "workflow/rules/simulate.smk"
include: "workflow/rules/cryoem.smk"
include: "workflow/rules/cryoem_recon.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/phase.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/report_cryoem.smk"


rule all:
    input:
        final_outputs(),
    default_target: True
