"""Imports run downward only (house rule 2): every module of src/vlmtune sits on a floor, and imports only modules on
its own floor or below — imports inside functions included. Library code never imports a command or the CLI.

The floors, low to high, each with why it sits where it does:

- base: errors, files, allocator, launch, labels, progress, other_keys — plain values and OS matters, no model.
- families: the registry of model families.
- data and settings: `data` (formats, templates, encoding, the encoded-data store) and `config`, which reads the
  template names from `data.template` while `data.loader` reads `config.DataConfig`.
- model: loading, adapters, the vision tower's fast path, adapter files.
- metrics: `evaluate.metrics` and `evaluate.table` — numbers from answers, used by training and prediction.
- inference: engines, scoring, generation, prediction.
- training and export: the loop (its evaluation scores through inference; do_predict predicts) and
  `model.export` (it merges through inference's engine).
- evaluation: the sweep and the report (they score checkpoints through inference).
- applications: the servers, the scene generator, the demo (which trains, predicts and evaluates).
- commands: `vlmtune.commands`, one module per `vlmtune <command>`.
- entry points: `cli`, `__main__`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import REPO

SRC = REPO / "src" / "vlmtune"
FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("vlmtune", "vlmtune.errors", "vlmtune.files", "vlmtune.allocator", "vlmtune.launch", "vlmtune.labels",
              "vlmtune.progress", "vlmtune.other_keys")),
    ("families", ("vlmtune.families",)),
    ("data and settings", ("vlmtune.data", "vlmtune.config")),
    ("model", ("vlmtune.model",)),
    ("metrics", ("vlmtune.evaluate.metrics", "vlmtune.evaluate.table")),
    ("inference", ("vlmtune.infer",)),
    ("training and export", ("vlmtune.train", "vlmtune.model.export")),
    ("evaluation", ("vlmtune.evaluate",)),
    ("applications", ("vlmtune.serve", "vlmtune.synth", "vlmtune.demo")),
    ("commands", ("vlmtune.commands",)),
    ("entry points", ("vlmtune.cli", "vlmtune.__main__")),
)


def floor_of(module: str) -> int | None:
    """The floor of a module: that of the longest name in FLOORS it is, or is inside (the package `vlmtune` itself
    only by its own name, so that a new package has to be placed)."""
    best, length = None, -1
    for index, (_, names) in enumerate(FLOORS):
        for name in names:
            inside = module == name or (name != "vlmtune" and module.startswith(name + "."))
            if inside and len(name) > length:
                best, length = index, len(name)
    return best


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> list[tuple[str, int]]:
    """(vlmtune module, line) of every import in the tree, at any depth — `from vlmtune import allocator` is the
    module vlmtune.allocator, `from vlmtune.x import name` the module vlmtune.x; relative imports resolved."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in known else base, node.lineno))
    return [(name, line) for name, line in found if name == "vlmtune" or name.startswith("vlmtune.")]


def violations(root: Path) -> list[str]:
    """Every import of a module on a higher floor than the importer's, and every module on no floor."""
    paths = sorted(root.rglob("*.py"))
    names = {module_name(p, root): p for p in paths}
    problems = []
    for name, path in names.items():
        floor = floor_of(name)
        if floor is None:
            problems.append(f"{name}: on no floor (add it to FLOORS in tests/test_layers.py)")
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for target, line in imported_modules(tree, name, path.name == "__init__.py", set(names)):
            target_floor = floor_of(target)
            if target_floor is not None and target_floor > floor:
                problems.append(f"{path.relative_to(root.parent)}:{line}: {name} ({FLOORS[floor][0]}) imports "
                                f"{target} ({FLOORS[target_floor][0]}), a floor above")
    return problems


def test_imports_run_downward_only():
    assert violations(SRC) == []


def test_every_command_lives_on_the_commands_floor():
    from vlmtune.cli import COMMANDS

    for name, (module, _) in COMMANDS.items():
        assert module.startswith("vlmtune.commands."), (name, module)
        assert (SRC / "commands" / f"{module.rsplit('.', 1)[1]}.py").is_file(), module


@pytest.mark.parametrize("planted", [
    "from vlmtune.commands.predict import main\n",                      # at the top of the module
    "def f():\n    from vlmtune.cli import main\n    return main\n",   # inside a function
    "def f():\n    import vlmtune.serve.api\n",                         # a plain import, inside a function
    "from vlmtune import demo\n",                                       # a package named in `from vlmtune import`
])
def test_a_planted_upward_import_is_found(tmp_path, planted):
    """The check itself: a copy of the source with one upward import in a library module fails it, naming it."""
    import shutil

    root = tmp_path / "vlmtune"
    shutil.copytree(SRC, root, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    target = root / "infer" / "output.py"
    target.write_text(target.read_text(encoding="utf-8") + "\n\n" + planted, encoding="utf-8")
    problems = violations(root)
    assert len(problems) == 1 and problems[0].startswith("vlmtune/infer/output.py:"), problems
    assert "vlmtune.infer.output (inference) imports" in problems[0]
