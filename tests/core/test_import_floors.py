"""The package is a house whose floors follow the data: a module imports only from its own floor or the floors
below it, no modules import each other in a circle, and no import inside a function hides an arrow.

The floors, bottom to top, are written once here (docs/architecture.md describes them).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Bottom to top. A module belongs to the floor of the longest prefix that names it.
FLOORS: list[tuple[str, ...]] = [
    ("pipeline.errors", "pipeline.runtime", "pipeline.config", "pipeline.precision", "pipeline.safe_pickle",
     "pipeline.distributed"),                                   # core: errors, YAML configs, precision, processes
    ("pipeline.geometry",),                                     # frames, transforms, BEV grids and ranges
    ("pipeline.data",),                                         # reading a nuScenes dataroot
    ("pipeline.synthetic",),                                    # writing a synthetic nuScenes dataroot
    ("pipeline.mvp",),                                          # writing MVP's virtual points
    ("pipeline.heads",),                                        # detection heads, their targets and decoding
    ("pipeline.eval",),                                         # metrics
    ("pipeline.teacher",),                                      # the LiDAR teacher
    ("cache_schemas", "pipeline.cache"),                        # stage one: the teacher-feature cache
    ("pipeline.student",),                                      # the camera students
    ("pipeline.losses",),                                       # the DistillBEV losses
    ("pipeline.distill",),                                      # stage two: training a student from the cache
    ("pipeline.report",),                                       # figures, qualitative pictures, cache renders
    ("stages",),                                                # one module per command
    ("cli",),                                                   # the command line
]
PACKAGE_ROOTS = ("pipeline", "stages", "cache_schemas")
# stages/ import what a command needs inside the command, so `distillbev --help` starts without torch's imports.
LAZY_IMPORTS_ALLOWED = ("stages",)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> list[Path]:
    files = [ROOT / "cli.py"]
    for root in PACKAGE_ROOTS:
        files += sorted((ROOT / root).rglob("*.py"))
    return files


def floor_of(module: str) -> int:
    if module == "pipeline":  # the package itself holds nothing
        return 0
    best, floor = -1, None
    for index, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, floor = len(prefix), index
    if floor is None:
        raise AssertionError(f"{module} is on no floor: add it to FLOORS in {Path(__file__).name}")
    return floor


def imported_modules(path: Path) -> list[tuple[str, int, bool]]:
    """(module, line, inside a function) for every import of a distillbev module in `path`; `from pkg import mod`
    names the submodule when it is one."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    local_lines = {node.lineno for function in ast.walk(tree)
                   if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for node in ast.walk(function) if isinstance(node, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("distillbev."):
                target = node.module[len("distillbev."):]
            else:
                continue
            for alias in node.names:
                candidate = f"{target}.{alias.name}" if target else alias.name
                is_module = (ROOT / Path(*candidate.split("."))).with_suffix(".py").is_file() or \
                    (ROOT / Path(*candidate.split(".")) / "__init__.py").is_file()
                found.append((candidate if is_module else target, node.lineno, node.lineno in local_lines))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("distillbev."):
                    found.append((alias.name[len("distillbev."):], node.lineno, node.lineno in local_lines))
    return [(module, line, local) for module, line, local in found if module]


def import_graph() -> dict[str, list[tuple[str, int, bool]]]:
    return {module_name(path): imported_modules(path) for path in source_files()}


def test_every_module_is_on_a_floor():
    for module in import_graph():
        floor_of(module)


def test_no_import_runs_up_the_floors():
    upward = [f"{module}:{line} imports {target} (floor {floor_of(target)} > {floor_of(module)})"
              for module, imports in import_graph().items() for target, line, _ in imports
              if floor_of(target) > floor_of(module)]
    assert not upward, "imports that run back up the floors:\n" + "\n".join(upward)


def test_no_import_inside_a_function_in_the_pipeline():
    hidden = [f"{module}:{line} imports {target} inside a function"
              for module, imports in import_graph().items() for target, line, local in imports
              if local and not module.startswith(LAZY_IMPORTS_ALLOWED)]
    assert not hidden, "function-local imports (move them to the top of the module):\n" + "\n".join(hidden)


def test_no_circle_of_imports():
    graph = {module: sorted({target for target, _, _ in imports if target != module})
             for module, imports in import_graph().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in graph.get(module, []):
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "modules that import each other in a circle:\n" + "\n".join(circles)


@pytest.mark.parametrize("source, expected", [
    ("from ..geometry.bev import BEVGrid\n", [("pipeline.geometry.bev", 1, False)]),
    ("def f():\n    from ..eval import nuscenes_eval\n", [("pipeline.eval.nuscenes_eval", 2, True)]),
    ("from distillbev.pipeline import errors\nimport numpy\n", [("pipeline.errors", 1, False)]),
])
def test_imports_are_read_as_written(tmp_path, monkeypatch, source, expected):
    """The reader itself, on a module placed at pipeline/data/example.py."""
    fake_root = tmp_path
    for package in ("pipeline", "pipeline/data", "pipeline/geometry", "pipeline/eval"):
        (fake_root / package).mkdir(parents=True, exist_ok=True)
        (fake_root / package / "__init__.py").write_text("")
    for module in ("pipeline/geometry/bev.py", "pipeline/eval/nuscenes_eval.py", "pipeline/errors.py"):
        (fake_root / module).write_text("")
    example = fake_root / "pipeline" / "data" / "example.py"
    example.write_text(source)
    monkeypatch.setitem(globals(), "ROOT", fake_root)
    assert imported_modules(example) == expected


def test_floors_are_looked_up_by_the_longest_prefix():
    assert floor_of("pipeline.errors") == 0
    assert floor_of("pipeline.data.loading") < floor_of("pipeline.synthetic.generate") < floor_of("pipeline.teacher.model")
    assert floor_of("pipeline.eval.nuscenes_eval") < floor_of("pipeline.teacher.train")  # a teacher reports its mAP
    assert floor_of("cache_schemas.v2") == floor_of("pipeline.cache.store")
    assert floor_of("pipeline.report.figures") > floor_of("pipeline.distill.run")
    with pytest.raises(AssertionError, match="on no floor"):
        floor_of("pipeline.newcomer")
