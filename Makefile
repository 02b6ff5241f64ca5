# Two commands for a fresh machine:
#   make demo   set up .venv and run the whole pipeline on the laptop demo (config/demo.yaml)
#   make test   set up .venv and run the test suite
#   make demo-cryoem   the same pipeline on the cryo-EM laptop demo (config/cryoem-demo.yaml)
# On a machine with an NVIDIA GPU, `make TORCH=torch demo` takes PyPI's default (CUDA) build.

PYTHON ?= python3
VENV   ?= .venv
CORES  ?= 2
CONFIG ?= config/demo.yaml
# CPU build of torch where there is no GPU; the package itself only asks for a range.
TORCH  ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.1,torch==2.13.0)
# No internet? Structures come from a local mirror (the repository's sibling ../shared/pdb if present).
XRAI_PDB_MIRROR ?= $(if $(wildcard ../shared/pdb),$(abspath ../shared/pdb),)
export XRAI_PDB_MIRROR

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-cryoem test setup report clean-results lint

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,slurm]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --configfile $(CONFIG)
	$(BIN)/snakemake --cores $(CORES) --configfile $(CONFIG) --report results/report.html
	@echo "Report: $(abspath results/report.html)"

demo-cryoem:
	$(MAKE) demo CONFIG=config/cryoem-demo.yaml

# two workers: the suite's pipelines spend much of their time in single-threaded startup and I/O;
# each test file stays on one worker, so a file's expensive fixtures (a whole pipeline, the Slurm cluster) are built once
test: $(STAMP)
	$(BIN)/python -m pytest -ra --durations=20 -n $(CORES) --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/snakemake --lint

clean-results:
	rm -rf results .snakemake
