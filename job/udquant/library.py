"""Where udquant's data files live: recipes/ in a checkout, udquant/recipes in a wheel."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path


def recipes_dir() -> Path:
    if os.environ.get("UDQUANT_RECIPES_DIR"):
        return Path(os.environ["UDQUANT_RECIPES_DIR"])
    packaged = Path(str(resources.files("udquant"))) / "recipes"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "recipes"


def data_file(name: str) -> Path:
    return Path(str(resources.files("udquant.data").joinpath(name)))
