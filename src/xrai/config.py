"""Load, default-fill and validate the pipeline configuration.

The JSON schema (draft 2020-12) in ``workflow/schemas/config.schema.yaml`` is the
single description of every key. Errors name the key and what is allowed, in one line.

Usage::

    from xrai.config import load_config, protein_entries
    cfg = load_config("config.yaml")              # raises XraiError on a bad key
    for name, spec in protein_entries(cfg).items():
        print(name, spec)                          # 2CEX_A {'pdb': '2CEX', 'chains': ['A']}
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from xrai.errors import XraiError

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"


def load_schema(path: str | os.PathLike | None = None) -> dict:
    """Read the config schema (by default the workflow's own)."""
    p = Path(path) if path is not None else SCHEMA_PATH
    if not p.exists():
        raise XraiError(f"config schema not found at {p}; run from a source checkout of xrai")
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


def _key_path(path: Any) -> str:
    parts = [f"[{p}]" if isinstance(p, int) else f".{p}" for p in path]
    return "".join(parts).lstrip(".") or "(top level)"


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
        raise XraiError(_describe(errors[0]))
    _check_consistency(config)
    return config


def _check_consistency(cfg: dict) -> None:
    sim = cfg["simulation"]
    if sim["test_seed"] == sim["seed"]:
        raise XraiError("config key 'simulation.test_seed' must differ from 'simulation.seed' so the test set is independent")
    names = [name for name, _ in _protein_list(cfg)]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise XraiError(f"config key 'proteins': duplicate protein names {sorted(dup)}")
    methods = [m["name"] for m in cfg["train"]["methods"]]
    if len(set(methods)) != len(methods):
        raise XraiError(f"config key 'train.methods': a method is listed twice: {methods}")
    if sim["storage"] == "sparse" and not sim["poisson_noise"]:
        raise XraiError("config key 'simulation.storage': sparse storage holds integer photon counts; "
                        "it needs 'simulation.poisson_noise: true'")
    radii = [r for r, _ in sim["background"]["radial"]]
    if radii != sorted(radii):
        raise XraiError(f"config key 'simulation.background.radial': radii must increase, got {radii}")
    tr = cfg["train"]
    if tr["eval_images"] > sim["test_size"]:
        raise XraiError(
            f"config key 'train.eval_images' ({tr['eval_images']}) exceeds 'simulation.test_size' ({sim['test_size']})")


def load_config(path: str | os.PathLike) -> dict:
    """Read a YAML config file, fill defaults and validate it."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise XraiError(f"{p}: config file not found") from None
    except yaml.YAMLError as exc:
        raise XraiError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    try:
        return validate_config(data)
    except XraiError as exc:
        raise XraiError(f"{p}: {exc}") from None


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


def method_runs(cfg: dict) -> dict[str, int]:
    """``{method: number of independent runs}`` from ``train.methods``."""
    return {m["name"]: int(m.get("runs", 1)) for m in cfg["train"]["methods"]}


def method_config(cfg: dict, method: str) -> dict:
    """A copy of ``cfg`` whose ``train`` section carries the overrides listed with ``method``.

    ``train.methods: [{name: known-pose, steps: 600, decoder: {width: 64}}]`` trains the
    known-pose bound for 600 steps with a narrower decoder, whatever ``train.steps`` says.
    """
    out = copy.deepcopy(cfg)
    entry = next((m for m in cfg["train"]["methods"] if m["name"] == method), {})
    for key, value in entry.items():
        if key in ("name", "runs"):
            continue
        if isinstance(value, dict):
            out["train"][key] = {**out["train"].get(key, {}), **value}
        else:
            out["train"][key] = value
    return out


def size_label(n: int) -> str:
    """Human label for a dataset size: 50000 -> '50K', 5000000 -> '5M', 16384 -> '16384'."""
    for div, suffix in ((1_000_000, "M"), (1_000, "K")):
        if n % div == 0:
            return f"{n // div}{suffix}"
    return str(n)
