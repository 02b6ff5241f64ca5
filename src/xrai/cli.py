"""The ``xrai`` command line: one subcommand per pipeline step.

Every Snakemake rule calls these same entry points (through ``scripts/``), so a
step runs identically with or without Snakemake. Each step lives in its own
module, which provides ``add_arguments(parser)`` and ``run(args)``; the modules are
ordinary imports, so the import graph shows every command's code.

Usage::

    xrai fetch --config config.yaml --protein 2CEX_A --out results/structures/2CEX_A.cif
    xrai simulate --help
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from xrai import __version__, structure
from xrai.cryoem import potential
from xrai.cryoem import simulate as simulate_cryoem
from xrai.errors import XraiError
from xrai.evaluation import cryoem as evaluate_cryoem
from xrai.evaluation import evaluate
from xrai.io import write_failure
from xrai.recon import emc, train
from xrai.report import cryoem_figures, cryoem_table, figures, table
from xrai.xray import density, phasing, simulate

logger = logging.getLogger(__name__)

_DATA = "results/datasets/2CEX_A"  # paths of the examples
_RUNS = "results/reconstructions/2CEX_A/2048"
#: subcommand -> (add_arguments, run, help, the one-line example ending its --help)
COMMANDS: dict[str, tuple[Callable, Callable, str, str]] = {
    "fetch": (structure.add_arguments, structure.run, "fetch a PDB entry, select chains, write mmCIF + summary",
              "xrai fetch --config config/test.yaml --protein 2CEX_A --out results/structures/2CEX_A.cif"),
    "simulate": (simulate.add_arguments, simulate.run, "simulate an SPI diffraction dataset to HDF5",
                 "xrai simulate --config config/test.yaml --structure results/structures/2CEX_A.cif "
                 f"--split train --n-images 2048 --out {_DATA}/train_2048.h5"),
    "simulate-cryoem": (simulate_cryoem.add_arguments, simulate_cryoem.run,
                        "simulate a cryo-EM particle set to RELION STAR + mrcs",
                        "xrai simulate-cryoem --config config/cryoem-test.yaml --structure results/structures/4AKE.cif "
                        "--protein 4AKE --split train --n-images 2048 --out results/datasets/4AKE/train_2048.star"),
    "potential": (potential.add_arguments, potential.run, "cryo-EM reference potential (MRC) from the atoms",
                  "xrai potential --config config/cryoem-test.yaml --structure results/structures/4AKE.cif "
                  "--protein 4AKE --out results/reference/4AKE/potential.mrc"),
    "reference": (density.add_arguments, density.run, "reference electron density and true intensity volume",
                  "xrai reference --config config/test.yaml --structure results/structures/2CEX_A.cif "
                  "--density results/reference/2CEX_A/density.mrc --intensity results/reference/2CEX_A/intensity.h5"),
    "train": (train.add_arguments, train.run, "train a reconstruction (X-RAI, paper recipe, known poses)",
              f"xrai train --config config/test.yaml --method xrai --run 0 --train-data {_DATA}/train_2048.h5 "
              f"--test-data {_DATA}/test_512.h5 --out-dir {_RUNS}/xrai/run0"),
    "select-best": (train.add_select_arguments, train.run_select, "pick the best of several runs by train pose error",
                    f"xrai select-best --run-dirs {_RUNS}/xrai/run0 {_RUNS}/xrai/run1 --out {_RUNS}/xrai/best.json"),
    "emc": (emc.add_arguments, emc.run, "non-amortized EMC baseline reconstruction",
            f"xrai emc --config config/test.yaml --train-data {_DATA}/train_2048.h5 --test-data {_DATA}/test_512.h5 "
            f"--out-dir {_RUNS}/emc/run0"),
    "phase": (phasing.add_arguments, phasing.run, "phase an amplitude volume with ER/HIO + shrinkwrap",
              f"xrai phase --config config/test.yaml --best {_RUNS}/xrai/best.json "
              "--out results/phased/2CEX_A/2048/xrai/density.mrc --history results/phased/2CEX_A/2048/xrai/phasing.json"),
    "evaluate": (evaluate.add_arguments, evaluate.run, "align, FSC and pose errors -> metrics.json",
                 "xrai evaluate --config config/test.yaml --protein 2CEX_A --size 2048 --method xrai "
                 f"--density results/phased/2CEX_A/2048/xrai/density.mrc --best {_RUNS}/xrai/best.json "
                 "--reference results/reference/2CEX_A/density.mrc "
                 "--reference-intensity results/reference/2CEX_A/intensity.h5 "
                 f"--train-data {_DATA}/train_2048.h5 --test-data {_DATA}/test_512.h5 "
                 "--out results/metrics/2CEX_A/2048/xrai/metrics.json"),
    "evaluate-cryoem": (evaluate_cryoem.add_arguments, evaluate_cryoem.run,
                        "cryo-EM: align, FSC (0.5 and 0.143), rotation and shift errors -> metrics.json",
                        "xrai evaluate-cryoem --config config/cryoem-test.yaml --protein 4AKE --size 2048 --method xrai "
                        "--run-dir results/reconstructions/4AKE/2048/xrai/run0 "
                        "--reference results/reference/4AKE/potential.mrc "
                        "--train-data results/datasets/4AKE/train_2048.star --test-data results/datasets/4AKE/test_512.star "
                        "--out results/metrics/4AKE/2048/xrai/metrics.json"),
    "table-cryoem": (cryoem_table.add_arguments, cryoem_table.run, "cryo-EM tables (cryoPoseNet and cryoAI style)",
                     "xrai table-cryoem --metrics results/metrics/4AKE/*/*/metrics.json "
                     "--out-md results/tables/cryoem.md --out-csv results/tables/cryoem.csv"),
    "table": (table.add_table_arguments, table.run_table, "the paper's Table 1 from metrics.json files",
              "xrai table --metrics results/metrics/*/*/*/metrics.json --csv table1.csv --md table1.md "
              "--tex table1.tex"),
    "figures": (figures.add_arguments, figures.run, "figures for the report",
                "xrai figures --kind protein --metrics results/metrics/2CEX_A/*/*/metrics.json "
                "--out-dir results/figures/2CEX_A"),
    "figures-cryoem": (cryoem_figures.add_arguments, cryoem_figures.run,
                       "cryo-EM figures: particle images, FSC, pose errors, density slices",
                       "xrai figures-cryoem "
                       "--metrics results/metrics/4AKE/*/*/metrics.json --out-dir results/figures/4AKE"),
}


def setup_logging(log_file: str | None = None, verbose: bool = False) -> None:
    """Log to stderr, and also to ``log_file`` when given (Snakemake's ``log:``)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        from pathlib import Path

        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="a"))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        handlers=handlers,
        force=True,
    )


def _log_to_files(message: str) -> None:
    """Record an error in the log files only; the terminal gets exactly one line from main()."""
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.emit(record)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; with ``command`` given, only that subcommand's arguments are added."""
    parser = argparse.ArgumentParser(prog="xrai", description="X-RAI reconstruction pipeline steps.")
    parser.add_argument("--version", action="version", version=f"xrai {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add_fn, run_fn, help_text, example) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=f"example: {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--log", metavar="FILE", help="also append log lines to FILE")
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        p.add_argument("--config", metavar="YAML", default="config.yaml",
                       help="pipeline config (validated against the schema; default: config.yaml)")
        if command is None or command == name:
            add_fn(p)
            p.set_defaults(_run=run_fn)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. User errors print one line and return exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 1
    try:
        setup_logging(args.log, args.verbose)
        try:
            args._run(args)
        except OSError as exc:  # a write outside xrai.io.atomic_path (a folder, a log file)
            raise (write_failure(exc.filename or "?", exc) or exc) from None
    except XraiError as exc:
        _log_to_files(f"xrai {args.command}: error: {exc}")
        print(f"xrai {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"xrai {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())


def run_from_snakemake(smk: object, command: str, args: Sequence[str]) -> None:
    """Entry point for ``scripts/*.py``: run ``xrai COMMAND --config <resolved> ARGS`` for a rule.

    The rule's resolved config (Snakemake's merged ``config``) is written to a
    temporary YAML file so that it goes through the same validation as on the
    command line; the rule's first ``log:`` file receives the log lines.
    """
    import os
    import tempfile

    import yaml

    log = list(getattr(smk, "log", []))
    # Jobs sharing a machine must not each take every core: a rule's `threads` is its CPU budget.
    os.environ["XRAI_THREADS"] = str(max(1, int(getattr(smk, "threads", 1))))
    from xrai.utils import set_cpu_threads

    set_cpu_threads(0)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="xrai-config-", delete=False) as fh:
        yaml.safe_dump(dict(smk.config), fh, sort_keys=False)
        cfg_path = fh.name
    try:
        argv = [command, "--config", cfg_path, *([f"--log={log[0]}"] if log else []), *map(str, args)]
        code = main(argv)
    finally:
        os.unlink(cfg_path)
    if code:
        raise SystemExit(code)
