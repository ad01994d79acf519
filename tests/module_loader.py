"""Load a module of the test tree by its path, once (the test folders are not packages, so a test area that reuses
another's builders imports the file itself): `load_tests_module("distill/test_distill_equivalence.py")`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

TESTS = Path(__file__).resolve().parent


def load_tests_module(relative: str, name: str | None = None) -> ModuleType:
    """tests/`relative` as a module registered in sys.modules under `name` (default: distillbev_tests_<file stem>),
    so every importer shares one module object and its module-level state."""
    name = name or f"distillbev_tests_{Path(relative).stem.removeprefix('test_')}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TESTS / relative)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
