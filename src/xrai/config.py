"""Load, default-fill and validate the pipeline configuration.

The JSON schema (draft 2020-12) in ``xrai/schemas/config.schema.yaml`` (shipped inside the
package; the workflow reads the same copy) is the single description of every key. Errors
name the key and what is allowed, in one line, with the file, line and column where known.

Usage::

    from xrai.config import load_config, protein_entries
    cfg = load_config("config.yaml")              # raises XraiError on a bad key
    for name, spec in protein_entries(cfg).items():
        print(name, spec)                          # 2CEX_A {'pdb': '2CEX', 'chains': ['A']}
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from xrai.errors import XraiError

logger = logging.getLogger(__name__)

#: the source checkout (tests and benches find config/ and scripts/ here; the package never needs it)
REPO_ROOT = Path(__file__).resolve().parents[2]
#: the one copy of the schema, package data (read by the CLI and by workflow/rules/common.smk)
SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "config.schema.yaml"


def load_schema(path: str | os.PathLike | None = None) -> dict:
    """Read the config schema (by default the package's own, ``xrai/schemas/config.schema.yaml``)."""
    p = Path(path) if path is not None else SCHEMA_PATH
    if not p.exists():
        raise XraiError(f"config schema not found at {p}; the xrai installation is incomplete (reinstall it)")
    return yaml.safe_load(p.read_text())


def _resolve_ref(schema: dict, root: dict) -> dict:
    while "$ref" in schema:
        ref = schema["$ref"]
        node: Any = root
        for part in ref.lstrip("#/").split("/"):
            node = node[part]
        schema = {**node, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def _fill_defaults(data: Any, schema: dict, root: dict) -> Any:
    schema = _resolve_ref(schema, root)
    if isinstance(data, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            sub_r = _resolve_ref(sub, root)
            if key not in data and "default" in sub_r:
                data[key] = copy.deepcopy(sub_r["default"])
            if key in data:
                data[key] = _fill_defaults(data[key], sub_r, root)
    elif isinstance(data, list) and isinstance(schema.get("items"), dict):
        items = _resolve_ref(schema["items"], root)
        if items.get("type") == "object":
            data = [_fill_defaults(d, items, root) for d in data]
    return data


class ConfigKeyError(XraiError):
    """A config error at one key; ``path`` (keys and list indices) lets the loader name its line and column."""

    def __init__(self, message: str, path: Any = ()) -> None:
        super().__init__(message)
        self.path = tuple(path)


def _key_path(path: Any) -> str:
    parts = [f"[{p}]" if isinstance(p, int) else f".{p}" for p in path]
    return "".join(parts).lstrip(".") or "(top level)"


def _error_path(error: Any) -> tuple:
    """The key path of a jsonschema error; for an unknown key, the unknown key itself."""
    path = tuple(error.absolute_path)
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        path += tuple(extra[:1])
    return path


def _describe(error: Any) -> str:
    """One readable line for a jsonschema error."""
    key = _key_path(error.absolute_path)
    sch = error.schema
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(sch.get("properties", {})))
        allowed = ", ".join(sorted(sch.get("properties", {})))
        full = extra[0] if key == "(top level)" else f"{key}.{extra[0]}"
        return f"unknown config key '{full}'; allowed keys here: {allowed}"
    if error.validator == "enum":
        return f"config key '{key}': {error.instance!r} is not allowed; expected one of {sch['enum']}"
    if error.validator == "required":
        return f"config key '{key}': {error.message}"
    if error.validator == "oneOf" and key.startswith("proteins"):
        return (f"config key '{key}': {error.instance!r} is not a protein spec; expected a PDB id with "
                "optional chain like '2CEX_A', {name, pdb[, chains]} or {name, file[, chains]}")
    desc = sch.get("description")
    return f"config key '{key}': {error.message}" + (f" ({desc})" if desc else "")


def validate_config(config: dict, schema: dict | None = None) -> dict:
    """Fill defaults and validate ``config`` in place; return it. Raises XraiError with one line."""
    import jsonschema

    schema = schema or load_schema()
    if not isinstance(config, dict):
        raise XraiError(f"config: expected a mapping of keys, got {type(config).__name__}")
    _fill_defaults(config, schema, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        raise ConfigKeyError(_describe(errors[0]), _error_path(errors[0]))
    _check_consistency(config)
    return config


def _check_consistency(cfg: dict) -> None:
    sim = cfg["simulation"]
    if sim["test_seed"] == sim["seed"]:
        raise ConfigKeyError("config key 'simulation.test_seed' must differ from 'simulation.seed' so the test set "
                             "is independent", ("simulation", "test_seed"))
    names = [name for name, _ in _protein_list(cfg)]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigKeyError(f"config key 'proteins': duplicate protein names {sorted(dup)}", ("proteins",))
    if "train" not in cfg:  # a cryo-EM config may stop at the datasets
        return
    methods = [m["name"] for m in cfg["train"]["methods"]]
    if len(set(methods)) != len(methods):
        raise ConfigKeyError(f"config key 'train.methods': a method is listed twice: {methods}", ("train", "methods"))
    _check_simulation(sim, ("simulation",))
    for i, (name, spec) in enumerate(_protein_list(cfg)):
        if not spec.get("simulation"):
            continue
        if modality(cfg) == "cryoem":
            raise ConfigKeyError(f"config key 'proteins[{i}].simulation' ({name}): per-protein simulation settings are "
                                 "X-ray photon statistics; a cryo-EM protein takes 'cryoem' overrides",
                                 ("proteins", i, "simulation"))
        _check_simulation(protein_config(cfg, name)["simulation"], ("proteins", i, "simulation"))
    tr = cfg["train"]
    if tr["eval_images"] > sim["test_size"]:
        raise ConfigKeyError(
            f"config key 'train.eval_images' ({tr['eval_images']}) exceeds 'simulation.test_size' ({sim['test_size']})",
            ("train", "eval_images"))


def _check_simulation(sim: dict, path: tuple) -> None:
    """The cross-key rules of one resolved simulation section (``path``: where it came from, for the message)."""
    where = _key_path(path)
    if sim["storage"] == "sparse" and not sim["poisson_noise"]:
        raise ConfigKeyError(f"config key '{where}.storage': sparse storage holds integer photon counts; "
                             f"it needs '{where}.poisson_noise: true'", (*path, "storage"))
    radii = [r for r, _ in sim["background"]["radial"]]
    if radii != sorted(radii):
        raise ConfigKeyError(f"config key '{where}.background.radial': radii must increase, got {radii}",
                             (*path, "background", "radial"))


def _where(path: Path, line: int, column: int) -> str:
    return f"{path}, line {line}, column {column}"


def key_location(text: str, key_path: Any) -> tuple[int, int, int] | None:
    """``(line, column, depth)`` of the deepest key of ``key_path`` present in the YAML ``text``.

    Line and column are 1-based; ``depth`` is how many keys of the path were found.

    >>> key_location("detector:\\n  n_pixels: -3\\n", ("detector", "n_pixels"))
    (2, 3, 2)
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    mark, depth = None, 0
    for part in key_path:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if match is None:
                break
            mark, node = match[0].start_mark, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            mark = node.start_mark
        else:
            break
        depth += 1
    return (mark.line + 1, mark.column + 1, depth) if mark is not None else None


def read_yaml(path: str | os.PathLike) -> Any:
    """Parse a YAML file; a syntax error names the file, line and column (XraiError)."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise XraiError(f"{p}: config file not found") from None
    except (IsADirectoryError, UnicodeDecodeError) as exc:
        raise XraiError(f"{p}: not a readable YAML text file ({exc})") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark, context = exc.problem_mark or exc.context_mark, exc.context_mark
        where = _where(p, mark.line + 1, mark.column + 1) if mark is not None else str(p)
        started = ""
        if exc.context and context is not None and context is not mark:
            started = f"{exc.context} started at line {context.line + 1}, column {context.column + 1}: "
        raise XraiError(f"{where}: not valid YAML ({started}{exc.problem or exc.context})") from None
    except yaml.YAMLError as exc:
        raise XraiError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None


def locate_error(exc: XraiError, files: list[str | os.PathLike]) -> str:
    """``exc``'s message prefixed by the file, line and column of its key in ``files``.

    Snakemake merges ``--configfile`` files in order: the key is reported in the file that
    holds most of its path, the last such file on a tie (the one whose value wins).
    """
    best: tuple[int, str] | None = None
    for f in files:
        try:
            text = Path(f).read_text()
        except OSError:
            continue
        loc = key_location(text, getattr(exc, "path", ()))
        if loc is not None and (best is None or loc[2] >= best[0]):
            best = (loc[2], _where(Path(f), loc[0], loc[1]))
    if best is None:
        return f"{files[-1]}: {exc}" if files else str(exc)
    return f"{best[1]}: {exc}"


def load_config(path: str | os.PathLike) -> dict:
    """Read a YAML config file, fill defaults and validate it.

    Errors name the file, line and column: ``config.yaml, line 14, column 3: unknown config key ...``.
    """
    p = Path(path)
    data = read_yaml(p)
    try:
        return validate_config(data)
    except XraiError as exc:
        raise XraiError(locate_error(exc, [p])) from None


def _protein_list(cfg: dict) -> list[tuple[str, dict]]:
    items = []
    for item in cfg["proteins"]:
        if isinstance(item, str):
            pdb, _, chain = item.partition("_")
            items.append((item, {"pdb": pdb.upper(), "chains": [chain] if chain else None}))
        else:
            spec = {k: v for k, v in item.items() if k != "name"}
            if "pdb" in spec:
                spec["pdb"] = spec["pdb"].upper()
            spec.setdefault("chains", None)
            items.append((item["name"], spec))
    return items


def protein_entries(cfg: dict) -> dict[str, dict]:
    """Normalise ``cfg['proteins']`` to ``{name: {'pdb': id, 'chains': [...]} or {'file': path, 'chains': ...}}``.

    ``'2CEX_A'`` means PDB id 2CEX, chain A; ``'1O9K'`` means every chain of 1O9K (``chains: None``).
    """
    return dict(_protein_list(cfg))


def modality(cfg: dict) -> str:
    """The imaging modality of a config: ``'xray'`` (the default, key absent) or ``'cryoem'``."""
    return str(cfg.get("modality", "xray"))


def cryoem_config(cfg: dict, protein: str | None = None) -> dict:
    """The ``cryoem`` section for ``protein``: the config's section with that protein's ``cryoem`` overrides.

    ``proteins: [{name: 4AKE_G, pdb: 4AKE, cryoem: {snr_db: 0, ctf: true}}]`` simulates 4AKE at 0 dB with
    a CTF whatever the top-level ``cryoem`` section says. Raises XraiError for a non-cryo-EM config.
    """
    if modality(cfg) != "cryoem" or "cryoem" not in cfg:
        raise XraiError("config key 'modality' must be 'cryoem' (with a 'cryoem' section) for this step")
    return copy.deepcopy(protein_config(cfg, protein)["cryoem"])


def has_photon_curve(cfg: dict) -> bool:
    """True for an X-ray config with per-protein ``simulation`` settings: the pipeline then also draws its
    photon curve (errors against photons per pattern over the proteins)."""
    return modality(cfg) == "xray" and any(spec.get("simulation") for _, spec in _protein_list(cfg))


def _override(section: dict, overrides: dict) -> None:
    """Apply ``overrides`` to ``section`` in place: a dict value is merged into the section's dict of that key
    (at every depth: ``{xrai: {poisson: {polish_passes: 2}}}`` keeps the section's other ``poisson`` keys),
    anything else replaces it.

    >>> s = {"xrai": {"heads": 8, "poisson": {"polish_passes": 4, "infer_pixels": 4096}}}
    >>> _override(s, {"xrai": {"poisson": {"polish_passes": 2}}})
    >>> s["xrai"]
    {'heads': 8, 'poisson': {'polish_passes': 2, 'infer_pixels': 4096}}
    """
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(section.get(key), dict):
            _override(section[key], value)
        else:  # a copy: the section never aliases the override's dicts
            section[key] = copy.deepcopy(value)


#: a protein entry's keys that override a top-level section for its steps (:func:`protein_config`), not its spec
PROTEIN_SECTION_OVERRIDES = ("train", "simulation", "cryoem")


def protein_config(cfg: dict, protein: str | None) -> dict:
    """A copy of ``cfg`` whose ``train``, ``simulation`` and ``cryoem`` sections carry ``protein``'s overrides of
    them (:data:`PROTEIN_SECTION_OVERRIDES`; the config as is for ``None`` or a protein without them).

    ``proteins: [{name: 4AKE_A, pdb: 4AKE, train: {xrai_cryoem: {train_snr_db: 10}}}]`` trains on 4AKE_A
    with training noise; its simulation and every other protein's reconstruction are unchanged.
    ``proteins: [{name: 2CEX_A_200, pdb: 2CEX, chains: [A], simulation: {min_total_intensity: 200}}]``
    simulates 2CEX chain A at 200 photons per pattern beside the config's other photon counts.
    """
    if not protein:
        return cfg
    entries = protein_entries(cfg)
    if protein not in entries:
        raise XraiError(f"protein '{protein}' is not in the config's proteins (expected one of {sorted(entries)})")
    overrides = {k: entries[protein][k] for k in PROTEIN_SECTION_OVERRIDES if entries[protein].get(k)}
    if not overrides:
        return cfg
    out = copy.deepcopy(cfg)
    for section, values in overrides.items():
        _override(out.setdefault(section, {}), values)
    return out


def method_runs(cfg: dict) -> dict[str, int]:
    """``{method: number of independent runs}`` from ``train.methods`` (none without a ``train`` section)."""
    return {m["name"]: int(m.get("runs", 1)) for m in cfg.get("train", {}).get("methods", [])}


def method_config(cfg: dict, method: str) -> dict:
    """A copy of ``cfg`` whose ``train`` section carries the overrides listed with ``method``.

    ``train.methods: [{name: known-pose, steps: 600, decoder: {width: 64}}]`` trains the
    known-pose bound for 600 steps with a narrower decoder, whatever ``train.steps`` says.
    """
    out = copy.deepcopy(cfg)
    entry = next((m for m in cfg["train"]["methods"] if m["name"] == method), {})
    _override(out["train"], {k: v for k, v in entry.items() if k not in ("name", "runs")})
    return out


def size_label(n: int) -> str:
    """Human label for a dataset size: 50000 -> '50K', 5000000 -> '5M', 16384 -> '16384'."""
    for div, suffix in ((1_000_000, "M"), (1_000, "K")):
        if n % div == 0:
            return f"{n // div}{suffix}"
    return str(n)


def split_seed(cfg: dict, split: str) -> int:
    """The seed of a split: ``simulation.seed`` (train) or ``simulation.test_seed`` (test)."""
    sim = cfg["simulation"]
    if split == "train":
        return int(sim["seed"])
    if split == "test":
        return int(sim["test_seed"])
    raise XraiError(f"split must be 'train' or 'test', got {split!r}")


# --------------------------------------------------------------------------- what a step depends on

#: keys that say how or where a step runs, not what it computes: editing them re-runs nothing
EXECUTION_KEYS = frozenset({
    "resources",
    "structure.mirror", "structure.cache_dir", "structure.download_url", "structure.timeout_s", "structure.retries",
    "simulation.device", "train.device", "train.num_threads", "train.checkpoint_every",
    "emc.device", "emc.num_threads", "emc.chunk_size", "phasing.device",
})


def _lookup(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _prune(value: Any, prefix: str, drop: set[str]) -> Any:
    if isinstance(value, dict):
        return {k: _prune(v, f"{prefix}.{k}", drop) for k, v in value.items() if f"{prefix}.{k}" not in drop}
    return value


def step_config(cfg: dict, *, method: str | None = None, protein: str | None = None,
                split: str | None = None) -> dict:
    """The config as one job of a step sees it: ``protein``'s train overrides applied
    (:func:`protein_config`), then ``method``'s (and the other methods' entries dropped),
    ``protein`` = its spec less its train and simulation overrides (they change its reconstructions
    and datasets only, through those sections; not its structure),
    ``split_seed`` = the split's seed."""
    view = protein_config(cfg, protein)
    view = method_config(view, method) if method is not None else dict(view)
    if method is not None:
        view["train"] = {k: v for k, v in view["train"].items() if k != "methods"}
    if protein is not None:
        view["protein"] = {k: v for k, v in protein_entries(cfg)[protein].items() if k not in PROTEIN_SECTION_OVERRIDES}
    if split is not None:
        view["split_seed"] = split_seed(cfg, split)
    return view


def config_values(cfg: dict, keys: Iterable[str], exclude: Iterable[str] = ()) -> dict:
    """The resolved values of the dotted ``keys`` of ``cfg`` less ``exclude`` and :data:`EXECUTION_KEYS`.

    >>> config_values({"detector": {"n_pixels": 32}, "train": {"lr": 1e-4, "device": "cpu"}},
    ...               ["detector.n_pixels", "train"])
    {'detector.n_pixels': 32, 'train': {'lr': 0.0001}}
    """
    drop = set(exclude) | EXECUTION_KEYS
    return {key: _prune(_lookup(cfg, key), key, drop) for key in keys if key not in drop}


def config_hash(cfg: dict, keys: Iterable[str], exclude: Iterable[str] = ()) -> str:
    """A short sha256 of :func:`config_values`: what a rule's ``params:`` records, so an edit of
    one of ``keys`` re-runs the rule (docs/architecture.md, "Which config keys a step depends on")."""
    text = json.dumps(config_values(cfg, keys, exclude), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def settings_from_section(cls: type, section: dict) -> Any:
    """A settings dataclass ``cls`` with its defaults replaced by ``section``'s keys, each cast to the
    default's type (tuples element-wise, to the type of the default's first element).

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class S:
    ...     steps: int = 10
    ...     sizes: tuple = (1.0, 2.0)
    >>> settings_from_section(S, {"steps": "20", "sizes": [3, 4]})
    S(steps=20, sizes=(3.0, 4.0))
    """
    from dataclasses import fields

    defaults, values = cls(), {}
    for f in fields(cls):
        if f.name in section:
            value, default = section[f.name], getattr(defaults, f.name)
            if isinstance(default, tuple):
                cast = type(default[0]) if default else int
                values[f.name] = tuple(cast(v) for v in value)
            elif default is None or value is None:  # an optional setting: the schema checked its type
                values[f.name] = value
            else:
                values[f.name] = type(default)(value)
    return cls(**values)  # constructed with the values, so a __post_init__ check sees them
