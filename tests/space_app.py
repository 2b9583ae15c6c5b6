"""space/app.py as a module, the way Spaces run it: a file of its own, not part of the udquant package."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

APP = Path(__file__).resolve().parents[1] / "space" / "app.py"


def load_app_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("udquant_space_app", APP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module
