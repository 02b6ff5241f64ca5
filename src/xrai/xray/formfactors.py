"""Waasmaier–Kirfel X-ray atomic form factors (the table skopi uses).

``f(s) = sum_{i=1..5} a_i exp(-b_i s^2) + c`` with ``s = sin(theta) / lambda = |q| / 2``
in Angstrom^-1, where ``q`` is xrai's reciprocal coordinate (no 2*pi). The
coefficients live in ``xrai/xray/data/waasmaier_kirfel.csv`` (neutral atoms and common
ions, the same numbers as skopi's ``load_waaskirf_database``). skopi evaluates the
formula on 101 samples of ``s`` in [0, 1.5] and interpolates with a cubic spline;
here the formula is evaluated exactly (they agree to ~1e-7, ``tests/test_scattering.py``).

Usage::

    import torch
    from xrai.xray.formfactors import atomic_form_factor
    q = torch.linspace(0, 0.13, 5)             # Angstrom^-1
    f_c = atomic_form_factor("C", q)           # ~6 electrons at q = 0
"""

from __future__ import annotations

import csv
import functools
import logging
from importlib import resources

import torch

from xrai.errors import XraiError

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _table() -> dict[tuple[str, int], tuple[tuple[float, ...], tuple[float, ...], float]]:
    text = resources.files("xrai.xray").joinpath("data/waasmaier_kirfel.csv").read_text()
    rows = csv.DictReader(line for line in text.splitlines() if not line.startswith("#"))
    table = {}
    for r in rows:
        a = tuple(float(r[f"a{i}"]) for i in range(1, 6))
        b = tuple(float(r[f"b{i}"]) for i in range(1, 6))
        # skopi takes the first row of a (Z, charge): keep the first
        table.setdefault((r["symbol"].upper(), int(r["charge"])), (a, b, float(r["c"])))
    return table


def normalize_element(element: str) -> str:
    """Canonical element key: upper-case symbol (``'Se'``, ``'SE'`` -> ``'SE'``)."""
    return str(element).strip().upper()


def known_elements() -> list[str]:
    """Element symbols (neutral) in the table."""
    return sorted({sym for sym, charge in _table() if charge == 0})


def form_factor_coefficients(element: str, charge: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(a (5,), b (5,), c)`` of an element (float64); XraiError for an element not in the table."""
    key = (normalize_element(element), int(charge))
    try:
        a, b, c = _table()[key]
    except KeyError:
        raise XraiError(
            f"no Waasmaier-Kirfel form factor for element {element!r} with charge {charge}; "
            f"known neutral elements: {', '.join(known_elements())}") from None
    return torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), c


def atomic_form_factor(element: str, q: torch.Tensor, charge: int = 0) -> torch.Tensor:
    """Form factor (electrons) of ``element`` at ``|q|`` (Angstrom^-1, no 2*pi); same shape and dtype as ``q``."""
    q = torch.as_tensor(q)
    if not q.is_floating_point():
        q = q.double()
    a, b, c = form_factor_coefficients(element, charge)
    a, b = a.to(q.device, q.dtype), b.to(q.device, q.dtype)
    s2 = (q / 2.0) ** 2
    return (a * torch.exp(-b * s2[..., None])).sum(-1) + c


@functools.lru_cache(maxsize=256)
def electron_count(element: str, charge: int = 0) -> float:
    """``f(0) = sum a_i + c``: the number of electrons the form factor integrates to."""
    a, _, c = form_factor_coefficients(element, charge)
    return float(a.sum()) + c
