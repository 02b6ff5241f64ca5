"""Fetch a PDB entry, select chains and atoms, write mmCIF and a JSON summary.

A protein is given by a spec from ``xrai.config.protein_entries``:

* ``{"pdb": "2CEX", "chains": ["A"]}`` (``chains: None`` keeps every chain);
* ``{"file": "path/to/x.pdb", "chains": [...] or None}``; a relative ``file`` is
  relative to the **current working directory** (under Snakemake: the workflow's
  ``--directory``).

A PDB id is looked up, in order, in

1. a local mirror directory: config ``structure.mirror``, overridden by the environment
   variable ``XRAI_PDB_MIRROR``. It accepts ``2cex.cif``, ``2CEX.cif``, ``2cex.pdb``,
   ``2CEX.pdb``, ``pdb2cex.ent``, each optionally ``.gz``, and the wwPDB "divided" layout
   (``<mirror>/ce/2cex.cif.gz``, ``<mirror>/ce/pdb2cex.ent.gz``, also below
   ``<mirror>/mmCIF/`` and ``<mirror>/pdb/``);
2. the download cache ``structure.cache_dir``;
3. an HTTPS download from ``structure.download_url`` (``{id}`` is replaced by the upper-case
   id), with ``timeout_s`` per try and ``retries`` more tries; the file is checked and then
   kept in the cache.

Parsing uses gemmi. A PDB file without an ``END`` record that holds fewer residues than its own
``SEQRES`` header declares (beyond those ``REMARK 465`` lists as unobserved), or whose last chain
stops without ``TER``, was cut short: it is refused with the counts unless
``structure.allow_partial`` is true. Only the first model is kept, and only the first alternate conformation;
waters, hydrogens and hetero residues (ligands, ions, glycans) are removed unless the
``structure.keep_*`` keys say otherwise.

Usage::

    from xrai.structure import fetch_structure, read_atoms
    summary = fetch_structure({"pdb": "2CEX", "chains": ["A"]}, cfg["structure"],
                              "results/structures/2CEX_A.cif", "results/structures/2CEX_A.json")
    positions, elements = read_atoms("results/structures/2CEX_A.cif")   # (N, 3) Angstrom, ["N", "C", ...]

    # command line (what the Snakemake rule fetch_pdb runs)
    xrai fetch --config config.yaml --protein 2CEX_A --out results/structures/2CEX_A.cif
"""

from __future__ import annotations

import argparse
import functools
import gzip
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import gemmi
import numpy as np

from xrai import __version__
from xrai.errors import XraiError
from xrai.io import atomic_path, provenance, write_json

logger = logging.getLogger(__name__)

MIRROR_ENV = "XRAI_PDB_MIRROR"
PDB_ID_PATTERN = re.compile(r"^[0-9][A-Za-z0-9]{3}$")
PROTEIN_NAME_PATTERN = re.compile(r"^[0-9][A-Za-z0-9]{3}(_[A-Za-z0-9]+)?$")

_CIF_SUFFIXES = (".cif", ".mmcif")
_PDB_SUFFIXES = (".pdb", ".ent")
#: force-field names of standard amino acids (CHARMM, Amber protonation states)
_FORCE_FIELD_RESIDUES = frozenset(
    {"HSD", "HSE", "HSP", "HID", "HIE", "HIP", "CYX", "CYM", "ASH", "GLH", "LYN"})


# --------------------------------------------------------------------------- specs


def protein_spec(cfg: dict, name: str) -> dict:
    """The spec of protein ``name``: from ``cfg['proteins']``, else parsed like a config string.

    >>> protein_spec({"proteins": []}, "2CEX_A")
    {'pdb': '2CEX', 'chains': ['A']}
    """
    from xrai.config import protein_entries

    entries = protein_entries(cfg) if cfg.get("proteins") else {}
    if name in entries:
        return dict(entries[name])
    if not PROTEIN_NAME_PATTERN.match(name):
        known = ", ".join(entries) or "none"
        raise XraiError(
            f"protein '{name}' is neither in the config's 'proteins' ({known}) nor a PDB id "
            "with optional chain like '2CEX_A'")
    return dict(protein_entries({"proteins": [name]})[name])


@functools.lru_cache(maxsize=1)
def _structure_defaults() -> dict[str, Any]:
    from xrai.config import load_schema

    keys = load_schema()["properties"]["structure"]["properties"]
    return {key: sub["default"] for key, sub in keys.items() if "default" in sub}


def _structure_config(structure_cfg: dict | None) -> dict:
    """``structure_cfg`` with the schema's defaults for missing keys (callers may pass a partial dict)."""
    return {**_structure_defaults(), **(structure_cfg or {})}


# --------------------------------------------------------------------------- sources


def mirror_dir(structure_cfg: dict | None) -> Path | None:
    """The local mirror directory: ``$XRAI_PDB_MIRROR`` if set, else ``structure.mirror``, else None.

    A mirror that is named but does not exist is an error (a typo would otherwise
    silently fall through to a download).
    """
    env = os.environ.get(MIRROR_ENV, "").strip()
    if env:
        path, origin = Path(env).expanduser(), f"environment variable {MIRROR_ENV}"
    else:
        value = _structure_config(structure_cfg).get("mirror")
        if not value:
            return None
        path, origin = Path(str(value)).expanduser(), "config key 'structure.mirror'"
    if not path.is_dir():
        raise XraiError(f"PDB mirror directory {path} (from {origin}) does not exist")
    return path


def mirror_candidates(mirror: str | os.PathLike, pdb_id: str) -> list[Path]:
    """Every path, in order of preference, where ``mirror`` may hold entry ``pdb_id``.

    mmCIF comes before PDB format because it is the wwPDB's master format (large
    entries exist only as mmCIF).

    >>> [p.name for p in mirror_candidates("/m", "2CEX")][:3]
    ['2cex.cif', '2CEX.cif', '2cex.cif.gz']
    """
    root = Path(mirror)
    low, up = pdb_id.lower(), pdb_id.upper()
    flat = [
        f"{low}.cif", f"{up}.cif", f"{low}.cif.gz", f"{up}.cif.gz",
        f"{low}.pdb", f"{up}.pdb", f"{low}.pdb.gz", f"{up}.pdb.gz",
        f"pdb{low}.ent", f"pdb{low}.ent.gz",
    ]
    middle = low[1:3]  # the wwPDB "divided" layout groups entries by the id's middle two characters
    divided = [
        root / middle / f"{low}.cif.gz", root / middle / f"pdb{low}.ent.gz",
        root / "mmCIF" / middle / f"{low}.cif.gz", root / "pdb" / middle / f"pdb{low}.ent.gz",
    ]
    return [root / name for name in flat] + divided


def find_in_mirror(mirror: str | os.PathLike, pdb_id: str) -> Path | None:
    """The first file in ``mirror`` holding ``pdb_id`` (see :func:`mirror_candidates`), or None."""
    for path in mirror_candidates(mirror, pdb_id):
        if path.is_file():
            return path
    return None


def _format_suffix(name: str) -> str:
    """``'2CEX.cif.gz'`` -> ``'.cif.gz'``; ``''`` when the name says nothing about the format."""
    low = name.lower()
    for ext in _CIF_SUFFIXES + _PDB_SUFFIXES:
        for tail in (ext, ext + ".gz"):
            if low.endswith(tail):
                return tail
    return ".gz" if low.endswith(".gz") else ""


def download_url(structure_cfg: dict | None, pdb_id: str) -> str:
    """``structure.download_url`` with ``{id}`` replaced by the upper-case id."""
    template = _structure_config(structure_cfg)["download_url"]
    try:
        return template.format(id=pdb_id.upper())
    except (KeyError, IndexError, ValueError):
        raise XraiError(
            f"config key 'structure.download_url': {template!r} must contain only the placeholder "
            "'{id}'") from None


def cache_path(structure_cfg: dict | None, pdb_id: str) -> Path:
    """Where a download of ``pdb_id`` is cached: ``<cache_dir>/<ID><suffix of the URL>``."""
    cfg = _structure_config(structure_cfg)
    url_name = urllib.request.urlparse(download_url(cfg, pdb_id)).path.rsplit("/", 1)[-1]
    return Path(cfg["cache_dir"]).expanduser() / f"{pdb_id.upper()}{_format_suffix(url_name) or '.cif'}"


def download_pdb(pdb_id: str, structure_cfg: dict | None) -> Path:
    """Download entry ``pdb_id`` into the cache (or reuse the cached copy); return its path.

    Transient failures (no connection, timeout, HTTP 5xx) are retried ``retries`` times
    with a growing pause; HTTP 404 is reported at once. The file is parsed before it is
    cached, so a broken download never poisons the cache.
    """
    cfg = _structure_config(structure_cfg)
    url = download_url(cfg, pdb_id)
    dest = cache_path(cfg, pdb_id)
    if dest.is_file():
        logger.info("PDB %s: using cached %s", pdb_id, dest)
        return dest
    attempts = 1 + int(cfg["retries"])
    request = urllib.request.Request(url, headers={"User-Agent": f"xrai/{__version__}"})
    last_reason = ""
    for attempt in range(attempts):
        if attempt:
            pause = min(0.5 * 2 ** (attempt - 1), 10.0)
            logger.warning("PDB %s: download failed (%s); retry %d/%d in %.1f s",
                           pdb_id, last_reason, attempt, attempts - 1, pause)
            time.sleep(pause)
        try:
            with urllib.request.urlopen(request, timeout=float(cfg["timeout_s"])) as response:
                data = response.read()
            break
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise XraiError(f"PDB id '{pdb_id}' not found at {url} (HTTP 404)") from None
            last_reason = f"HTTP {exc.code} {exc.reason}"
            if exc.code < 500 and exc.code != 429:  # other client errors do not heal by retrying
                raise XraiError(f"download of PDB id '{pdb_id}' from {url} failed: {last_reason}") from None
        except urllib.error.URLError as exc:
            last_reason = str(exc.reason)
        except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
            last_reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    else:
        raise XraiError(
            f"cannot download PDB id '{pdb_id}' from {url} after {attempts} "
            f"{'try' if attempts == 1 else 'tries'} ({last_reason}); "
            f"without network, set {MIRROR_ENV} to a directory holding {pdb_id.lower()}.pdb or "
            f"{pdb_id.lower()}.cif")
    _parse_bytes(data, dest.name, origin=url)  # raises XraiError on an empty or malformed file
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    logger.info("PDB %s: downloaded %s (%d bytes) to %s", pdb_id, url, len(data), dest)
    return dest


def resolve_structure_source(spec: dict, structure_cfg: dict | None) -> Path:
    """The coordinate file for ``spec``: the local file, else the mirror, else the (cached) download.

    >>> resolve_structure_source({"pdb": "2CEX", "chains": ["A"]}, cfg["structure"])
    PosixPath('/data/pdb/2cex.pdb')
    """
    if spec.get("file"):
        path = Path(spec["file"]).expanduser()
        if not path.is_file():
            where = "" if path.is_absolute() else f" (relative paths are relative to {Path.cwd()})"
            raise XraiError(f"protein file {spec['file']} not found{where}")
        return path
    pdb_id = str(spec.get("pdb") or "")
    if not PDB_ID_PATTERN.match(pdb_id):
        raise XraiError(f"protein spec {spec!r}: expected 'pdb' (a 4-character PDB id like 2CEX) or 'file'")
    mirror = mirror_dir(structure_cfg)
    if mirror is not None:
        found = find_in_mirror(mirror, pdb_id)
        if found is not None:
            logger.info("PDB %s: found %s in the mirror", pdb_id, found)
            return found
        logger.info("PDB %s: not in mirror %s; trying the cache and download", pdb_id, mirror)
    return download_pdb(pdb_id, structure_cfg)


# --------------------------------------------------------------------------- parsing


def pdb_shortfall(text: str) -> list[str]:
    """How a PDB file without ``END`` falls short of its own header (empty when it does not, or has END).

    Per chain of ``SEQRES``: residues with atoms + residues ``REMARK 465`` lists as missing,
    against the declared count; and a last chain whose atoms are not closed by ``TER``.

    >>> pdb_shortfall("SEQRES   1 A    3  ALA GLY SER\\nATOM      1  CA  ALA A   1      0.000   0.000   0.000  1.00  0.00           C\\n")
    ['chain A: 1 residues with atoms + 0 listed as missing (REMARK 465) of 3 in SEQRES', 'chain A stops without TER']
    """
    lines = text.splitlines()
    if any(line.rstrip() == "END" for line in lines):
        return []
    declared: dict[str, tuple[int, set[str]]] = {}
    for line in lines:
        if line.startswith("SEQRES") and len(line) > 17 and line[13:17].strip().isdigit():
            count, names = declared.get(line[11], (int(line[13:17]), set()))
            declared[line[11]] = (count, names | set(line[19:].split()))
    if not declared:
        return []
    missing: Counter = Counter()
    for line in lines:
        m = re.match(r"^REMARK 465 +(?:\d+ +)?[A-Z0-9]{1,3} +(\S) +-?\d+[A-Z]? *$", line)
        if m:
            missing[m.group(1)] += 1
    observed: dict[str, set[str]] = {c: set() for c in declared}
    last_atom, last_ter = -1, -1
    for i, line in enumerate(lines):
        if line.startswith(("ATOM  ", "HETATM")) and len(line) > 26 and line[21] in declared:
            if line.startswith("ATOM") or line[17:20].strip() in declared[line[21]][1]:
                observed[line[21]].add(line[22:27])
                last_atom = i
        elif line.startswith("TER"):
            last_ter = i
    short = [f"chain {c}: {len(observed[c])} residues with atoms + {missing[c]} listed as missing (REMARK 465) "
             f"of {n} in SEQRES" for c, (n, _) in declared.items() if len(observed[c]) + missing[c] < n]
    if last_atom > last_ter:
        short.append(f"chain {lines[last_atom][21]} stops without TER")
    return short


def _parse_bytes(data: bytes, name: str, origin: str | None = None, allow_partial: bool = True) -> gemmi.Structure:
    """Parse PDB or mmCIF bytes (gzip allowed); ``name`` gives the format, ``origin`` names it in errors.

    Unless ``allow_partial``, a PDB file cut short (:func:`pdb_shortfall`) is refused.
    """
    label = origin or name
    if name.lower().endswith(".gz") or data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise XraiError(f"{label}: not a valid gzip file ({exc})") from None
    if not data.strip():
        raise XraiError(f"{label}: file is empty")
    text = data.decode("latin-1")  # PDB files are ASCII; latin-1 never fails on stray bytes
    suffix = _format_suffix(name).removesuffix(".gz")
    is_cif = suffix in _CIF_SUFFIXES or (suffix == "" and text.lstrip().startswith("data_"))
    try:
        if is_cif:
            doc = gemmi.cif.read_string(text)
            if len(doc) == 0:
                raise XraiError(f"{label}: malformed mmCIF (no data block)")
            st = gemmi.make_structure_from_block(doc[0])
        else:
            st = gemmi.read_pdb_string(text)
            if not re.search(r"^(ATOM  |HETATM).{70}[ A-Za-z][A-Za-z]", text, re.MULTILINE):
                _elements_from_atom_names(st)
    except (ValueError, RuntimeError) as exc:
        kind = "mmCIF" if is_cif else "PDB"
        detail = re.sub(r"^string:", "line ", str(exc).splitlines()[0])  # gemmi names the text "string"
        raise XraiError(f"{label}: malformed {kind} file ({detail})") from None
    if len(st) == 0 or st[0].count_atom_sites() == 0:
        raise XraiError(f"{label}: no atoms found (empty or not a PDB/mmCIF coordinate file)")
    if not is_cif and not allow_partial:
        short = pdb_shortfall(text)
        if short:
            raise XraiError(f"{label}: truncated? no END record and {st[0].count_atom_sites()} atoms that fall "
                            f"short of the file's own header: {'; '.join(short)}; set structure.allow_partial: "
                            "true to use it anyway")
    st.merge_chain_parts()  # PDB files may split a chain at TER (e.g. its waters); rejoin them
    st.name = st.info["_entry.id"] if "_entry.id" in st.info else ""  # the PDB id of the header, if any
    return st


def _elements_from_atom_names(st: gemmi.Structure) -> None:
    """Set elements of standard residues from atom names, for PDB files without the element column.

    gemmi then guesses from columns 13-14, which misreads files whose atom names are not
    aligned to the standard (CHARMM-style "CA  " becomes calcium). In standard amino acids
    and nucleotides every element is one letter: the first letter of the atom name. The same
    holds for the protonation-state names of force fields (CHARMM ``HSD``, Amber ``HIE``, ...).
    """
    for model in st:
        for chain in model:
            for residue in chain:
                info = gemmi.find_tabulated_residue(residue.name)
                standard = info is not None and info.is_standard()
                if not standard and residue.name not in _FORCE_FIELD_RESIDUES:
                    continue
                for atom in residue:
                    letter = next((c for c in atom.name if c.isalpha()), "")
                    if letter:
                        atom.element = gemmi.Element(letter)


def read_structure_file(path: str | os.PathLike, allow_partial: bool = False) -> gemmi.Structure:
    """Parse a PDB or mmCIF file (optionally gzipped) with gemmi; XraiError names the file on failure.

    A PDB file cut short is refused unless ``allow_partial`` (:func:`pdb_shortfall`).
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise XraiError(f"{p}: file not found") from None
    except IsADirectoryError:
        raise XraiError(f"{p}: is a directory, expected a PDB or mmCIF file") from None
    return _parse_bytes(data, p.name, origin=str(p), allow_partial=allow_partial)


def _atom_count(st: gemmi.Structure) -> int:
    return sum(m.count_atom_sites() for m in st)


def _remove_residues(st: gemmi.Structure, drop: Any) -> None:
    for model in st:
        for chain in model:
            for i in reversed(range(len(chain))):
                if drop(chain[i]):
                    del chain[i]


def select_atoms(
    st: gemmi.Structure,
    chains: list[str] | None = None,
    keep_waters: bool = False,
    keep_hydrogens: bool = False,
    keep_hetero: bool = False,
    label: str = "structure",
) -> dict[str, int]:
    """Reduce ``st`` in place to the atoms the simulation uses; return atoms removed per reason.

    * only the first model: an NMR ensemble holds alternative solutions of one molecule;
    * only ``chains`` (all when None); a chain that does not exist is an error listing those that do;
    * hydrogens, waters and hetero residues (non-polymer: ligands, ions, glycans; modified
      residues inside the chain, e.g. MSE, belong to the polymer and stay) unless kept;
    * only the first alternate conformation: every atom is simulated at full weight, so keeping
      all conformers would count disordered atoms twice, at overlapping positions.
    """
    removed: dict[str, int] = {}

    def step(reason: str, action: Any) -> None:
        before = _atom_count(st)
        action()
        removed[reason] = before - _atom_count(st)

    step("other_models", lambda: st.__delitem__(slice(1, None)))
    present = list(dict.fromkeys(ch.name for ch in st[0]))
    if chains:
        missing = [c for c in chains if c not in present]
        if missing:
            shown = ", ".join(repr(c) for c in present)
            raise XraiError(f"{label}: chain {', '.join(map(repr, missing))} not found; chains present: {shown}")
        wanted = set(chains)
        step("other_chains", lambda: [st[0].remove_chain(c) for c in present if c not in wanted])
    st.setup_entities()  # entity types (polymer / non-polymer / water) for the filters below
    if not keep_hydrogens:
        step("hydrogens", st.remove_hydrogens)
    if not keep_waters:
        step("waters", st.remove_waters)
    if not keep_hetero:
        keep_types = (gemmi.EntityType.Polymer, gemmi.EntityType.Water)
        step("hetero", lambda: _remove_residues(st, lambda r: r.entity_type not in keep_types))
    step("alternate_conformations", st.remove_alternative_conformations)
    st.remove_empty_chains()
    unknown = [f"{r.name}{r.seqid.num}/{a.name}" for ch in st[0] for r in ch for a in r if a.element.name == "X"]
    if unknown:
        raise XraiError(f"{label}: {len(unknown)} atoms have no known element (first: {unknown[0]}); "
                        "add the element symbols (PDB columns 77-78)")
    if _atom_count(st) == 0:
        kept = ", ".join(chains) if chains else "all"
        raise XraiError(
            f"{label}: the selection (chains {kept}, keep_waters={keep_waters}, "
            f"keep_hydrogens={keep_hydrogens}, keep_hetero={keep_hetero}) leaves 0 atoms")
    return removed


def load_structure(
    path: str | os.PathLike,
    chains: list[str] | None = None,
    keep_waters: bool = False,
    keep_hydrogens: bool = False,
    keep_hetero: bool = False,
    allow_partial: bool = False,
) -> gemmi.Structure:
    """Read ``path`` and keep the selected atoms (see :func:`select_atoms`).

    >>> st = load_structure("../shared/pdb/2cex.pdb", chains=["A"])
    >>> st[0].count_atom_sites()
    2362
    """
    st = read_structure_file(path, allow_partial)
    select_atoms(st, chains, keep_waters, keep_hydrogens, keep_hetero, label=str(path))
    return st


def read_atoms(cif_path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """Atom positions (N, 3) in Angstrom (float64) and element symbols ("C", "Fe", ...) of the first model.

    The one reader of atoms for the whole project (e.g. the simulator reads the
    ``results/structures/{protein}.cif`` written by :func:`fetch_structure`).

    >>> positions, elements = read_atoms("results/structures/2CEX_A.cif")
    """
    st = read_structure_file(cif_path)
    atoms = [atom for chain in st[0] for residue in chain for atom in residue]
    positions = np.array([[a.pos.x, a.pos.y, a.pos.z] for a in atoms], dtype=np.float64).reshape(-1, 3)
    return positions, [a.element.name for a in atoms]


# --------------------------------------------------------------------------- summary


def max_pairwise_distance(points: np.ndarray) -> float:
    """Largest distance between two of ``points`` (N, 3), exactly.

    The farthest pair are always vertices of the convex hull, so only those (a few
    hundred of thousands of atoms) are compared; degenerate (flat) sets fall back to
    all pairs, in blocks.
    """
    from scipy.spatial import ConvexHull, QhullError
    from scipy.spatial.distance import cdist, pdist

    pts = np.asarray(points, dtype=np.float64)
    if len(pts) < 2:
        return 0.0
    try:
        pts = pts[ConvexHull(pts).vertices]
    except (QhullError, ValueError):
        best = 0.0
        for start in range(0, len(pts), 2048):
            best = max(best, float(cdist(pts[start:start + 2048], pts).max()))
        return best
    return float(pdist(pts).max())


def summarize(st: gemmi.Structure) -> dict[str, Any]:
    """Chains, atom counts, element counts, centre, radius of gyration and maximal extent of model 1.

    Centre and radius of gyration are unweighted (every atom counts once); lengths in Angstrom.

    >>> summarize(load_structure("../shared/pdb/2cex.pdb", ["A"]))["n_atoms"]
    2362
    """
    model = st[0]
    atoms = [atom for chain in model for residue in chain for atom in residue]
    pos = np.array([[a.pos.x, a.pos.y, a.pos.z] for a in atoms], dtype=np.float64).reshape(-1, 3)
    centre = pos.mean(axis=0) if len(pos) else np.zeros(3)
    rg = float(np.sqrt(((pos - centre) ** 2).sum(axis=1).mean())) if len(pos) else 0.0
    per_chain: dict[str, int] = {}
    for chain in model:
        per_chain[chain.name] = per_chain.get(chain.name, 0) + chain.count_atom_sites()
    elements = Counter(a.element.name for a in atoms)
    return {
        "chains": list(per_chain),
        "atoms_per_chain": per_chain,
        "n_atoms": len(atoms),
        "n_residues": sum(len(chain) for chain in model),
        "elements": dict(sorted(elements.items())),
        "centre_A": [round(float(c), 4) for c in centre],
        "radius_of_gyration_A": round(rg, 4),
        "max_extent_A": round(max_pairwise_distance(pos), 4),
    }


# --------------------------------------------------------------------------- the step


def fetch_structure(
    spec: dict,
    structure_cfg: dict | None,
    out_cif: str | os.PathLike,
    out_summary: str | os.PathLike,
    name: str | None = None,
    config: dict | None = None,
) -> dict[str, Any]:
    """Resolve, parse and select ``spec``; write the atoms as mmCIF and a JSON summary; return the summary.

    ``config`` (the full resolved config) is stored in the summary's provenance.

    >>> fetch_structure({"pdb": "2CEX", "chains": ["A"]}, {}, "2CEX_A.cif", "2CEX_A.json")["n_atoms"]
    2362
    """
    cfg = _structure_config(structure_cfg)
    source = resolve_structure_source(spec, cfg)
    st = read_structure_file(source, bool(cfg["allow_partial"]))
    chains = spec.get("chains") or None
    removed = select_atoms(st, chains, bool(cfg["keep_waters"]), bool(cfg["keep_hydrogens"]),
                           bool(cfg["keep_hetero"]), label=str(source))
    pdb_id = spec.get("pdb") or st.name or None
    st.name = pdb_id or name or Path(source).name.split(".")[0]
    with atomic_path(out_cif) as tmp:
        st.make_mmcif_document().write_file(str(tmp))
    summary: dict[str, Any] = {
        "name": name,
        "pdb_id": pdb_id,
        "source": str(source),
        "chains_requested": chains,
        **summarize(st),
        "removed_atoms": removed,
        "selection": {k: bool(cfg[k]) for k in ("keep_waters", "keep_hydrogens", "keep_hetero")},
        "provenance": provenance(config),
    }
    write_json(out_summary, summary)
    logger.info("%s: %d atoms in chains %s from %s -> %s (Rg %.1f A, extent %.1f A)",
                name or pdb_id, summary["n_atoms"], ",".join(repr(c) if not c.strip() else c for c in summary["chains"]),
                source, out_cif,
                summary["radius_of_gyration_A"], summary["max_extent_A"])
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``xrai fetch`` (``--config`` is added by xrai.cli)."""
    parser.add_argument("--protein", required=True,
                        help="a name from the config's 'proteins', or a PDB id with chain like 2CEX_A")
    parser.add_argument("--out", required=True, metavar="CIF", help="output mmCIF of the selected atoms")
    parser.add_argument("--summary", metavar="JSON", help="output summary (default: OUT with .json)")


def run(args: argparse.Namespace) -> None:
    """``xrai fetch``: one protein to mmCIF + JSON summary."""
    from xrai.config import load_config

    cfg = load_config(args.config)
    spec = protein_spec(cfg, args.protein)
    summary = args.summary or str(Path(args.out).with_suffix(".json"))
    fetch_structure(spec, cfg.get("structure"), args.out, summary, name=args.protein, config=cfg)
