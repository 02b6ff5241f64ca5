"""The layout's rules (docs/architecture.md), checked on the package's import graph.

Every ``import`` statement counts, including those inside functions, so that no
dependency hides from the graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "xrai"
PHYSICS = ("xrai.xray", "xrai.cryoem")
LEARNING = ("xrai.recon", "xrai.evaluation", "xrai.report")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the xrai modules (and top-level third-party packages) it imports."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                # `from xrai.recon import train` imports the submodule xrai.recon.train
                deps.update(f"{node.module}.{a.name}" for a in node.names
                            if (PACKAGE.parent / f"{node.module}.{a.name}".replace(".", "/")).with_suffix(".py").exists())
        graph[name] = deps
    return graph


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_graph_sees_the_package():
    graph = import_graph()
    assert {"xrai.recon.train", "xrai.xray.scattering", "xrai.imaging", "xrai.recon.recipes"} <= set(graph)
    assert "xrai.recon.recipe" in graph["xrai.recon.abinitio"]


def test_physics_never_imports_learning():
    bad = {m: sorted(d for d in deps if within(d, LEARNING))
           for m, deps in import_graph().items() if within(m, PHYSICS)}
    assert not {m: d for m, d in bad.items() if d}


def test_imaging_modalities_do_not_import_each_other():
    """X-ray and cryo-EM physics share only modality-agnostic modules (e.g. ``xrai.random_streams``)."""
    graph = import_graph()
    xray_to_em = {m: sorted(d for d in deps if within(d, ("xrai.cryoem",)))
                  for m, deps in graph.items() if within(m, ("xrai.xray",))}
    em_to_xray = {m: sorted(d for d in deps if within(d, ("xrai.xray",)))
                  for m, deps in graph.items() if within(m, ("xrai.cryoem",))}
    assert not {m: d for m, d in (xray_to_em | em_to_xray).items() if d}


def test_package_never_imports_snakemake():
    bad = [m for m, deps in import_graph().items() if any(within(d, ("snakemake",)) for d in deps)]
    assert not bad


@pytest.mark.parametrize("recipe_module", ["xrai.recon.recipe", "xrai.recon.paper", "xrai.recon.abinitio",
                                           "xrai.recon.models", "xrai.recon.losses",
                                           "xrai.recon.cryoem", "xrai.recon.wiener", "xrai.recon.cryoai",
                                           "xrai.recon.cryoposenet"])
def test_recipes_reach_physics_only_through_the_imaging_interface(recipe_module):
    deps = import_graph()[recipe_module]
    assert not [d for d in deps if within(d, PHYSICS)]


def test_no_import_cycles():
    full = import_graph()
    graph = {m: {d for d in deps if d in full and d != m and d != "xrai"} for m, deps in full.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, stack: list[str]) -> bool:
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                cycle.extend(stack[stack.index(d):] + [m, d] if d in stack else [m, d])
                return True
            if d not in state and visit(d, stack + [m]):
                return True
        state[m] = 2
        return False

    for m in graph:
        if m not in state and visit(m, []):
            break
    assert not cycle, " -> ".join(cycle)


def test_recipes_are_ordinary_imports():
    from xrai.recon import abinitio, paper, recipes

    assert recipes.RECIPES["xrai"] is abinitio.XraiRecipe
    assert recipes.RECIPES["xrai-paper"] is paper.PaperRecipe
    assert all(isinstance(v, type) for v in recipes.RECIPES.values())
