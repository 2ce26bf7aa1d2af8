"""dvc.yaml's dependencies are complete: every module of this project that a stage's command
imports is among the stage's deps, so changing it reruns the stage.

The imports are read from the source (``ast``), not by running anything: for ``tpgrpo <sub>``,
the command line's module-level imports plus those inside ``cmd_<sub>`` and the ``cli`` helpers
it calls, then every module those import, at any depth and in any function (a lazily imported
module runs as surely as an eagerly imported one).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tpgrpo"
# The package's __init__ only reads the installed version: no stage output depends on it.
EXEMPT = {PACKAGE / "__init__.py"}


def _module_path(name: str) -> Path | None:
    """tpgrpo.models.sd3 -> tpgrpo/models/sd3.py (a package: its __init__.py); None outside the project."""
    if name != "tpgrpo" and not name.startswith("tpgrpo."):
        return None
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported(nodes: list[ast.AST]) -> set[Path]:
    """The project's modules imported anywhere under ``nodes``, with the packages they sit in."""
    names: set[str] = set()
    for node in nodes:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import):
                names.update(alias.name for alias in sub.names)
            elif isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0:
                names.add(sub.module)
                names.update(f"{sub.module}.{alias.name}" for alias in sub.names)  # `from tpgrpo import world`
    paths = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            path = _module_path(".".join(parts[:i]))
            if path is not None:
                paths.add(path)
    return paths


def _closure(start: set[Path]) -> set[Path]:
    seen: set[Path] = set()
    todo = list(start)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(_imported([ast.parse(path.read_text())]) - seen)
    return seen


def command_modules(subcommand: str) -> set[Path]:
    """Every project file ``tpgrpo <subcommand>`` can import."""
    cli = PACKAGE / "cli.py"
    tree = ast.parse(cli.read_text())
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    used, todo = set(), [f"cmd_{subcommand}", "main"]
    while todo:
        name = todo.pop()
        if name in used or name not in functions:
            continue
        used.add(name)
        todo.extend(n.id for n in ast.walk(functions[name]) if isinstance(n, ast.Name))
    # cli.py itself is read above, function by function: its other commands' imports are not this one's.
    return ({cli} | _closure(_imported(top + [functions[name] for name in used]) - {cli})) - EXEMPT


def _stages() -> dict[str, dict]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


def _covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(ROOT)
    return any(relative == Path(dep) or Path(dep) in relative.parents for dep in deps)


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_every_imported_module_is_a_dependency(stage: str) -> None:
    body = _stages()[stage]
    program, subcommand = body["cmd"].split()[:2]
    assert program == "tpgrpo"
    deps = [str(d) for d in body.get("deps", [])]
    missing = sorted(str(p.relative_to(ROOT)) for p in command_modules(subcommand) if not _covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage!r} (`{body['cmd']}`) imports these but does not depend on them: {missing}"


def test_the_reader_finds_lazy_imports() -> None:
    """The check sees an import inside a function (cmd_train loads the trainer lazily) and what
    that module imports in turn."""
    train = command_modules("train")
    assert {PACKAGE / "trainer.py", PACKAGE / "loss.py", PACKAGE / "models" / "sd3.py"} <= train
    assert PACKAGE / "pretrain.py" not in train and PACKAGE / "pretrain.py" in command_modules("pretrain")
