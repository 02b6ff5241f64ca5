"""Every training method, by name: the one dispatch point of ``xrai train --method``.

Built by ordinary imports, so the import graph shows which recipe comes from where.

Usage::

    from xrai.recon.recipes import RECIPES, get_recipe
    recipe = get_recipe("xrai", cfg)
"""

from __future__ import annotations

from xrai.errors import XraiError
from xrai.recon.abinitio import XraiKnownPoseRecipe, XraiRecipe
from xrai.recon.paper import KnownPoseRecipe, PaperRecipe
from xrai.recon.recipe import Recipe

#: method name -> recipe class
RECIPES: dict[str, type[Recipe]] = {
    "xrai-paper": PaperRecipe,
    "known-pose": KnownPoseRecipe,
    "xrai": XraiRecipe,
    "xrai-known-pose": XraiKnownPoseRecipe,
}


def get_recipe(method: str, cfg: dict) -> Recipe:
    """Instantiate the recipe of ``method`` (XraiError naming the allowed ones otherwise)."""
    try:
        return RECIPES[method](cfg)
    except KeyError:
        raise XraiError(f"unknown training method '{method}'; expected one of {sorted(RECIPES)}") from None
