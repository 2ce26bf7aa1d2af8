"""The import graph keeps its layers, read from the source (``ast``):

- no module imports another module's private (``_``-prefixed) names;
- ``tpgrpo/models`` and ``tpgrpo/rewards`` import nothing above them (models: only themselves and
  the error types; rewards: also the task's world, its prompt-file reader and the leaf helpers);
- the algorithm's tensor functions import only torch;
- ``flows/`` holds no algorithm (no tensor module, no torch) and no polling (no ``sleep``);
- the config schema builds nothing (no rewards, no torch), and every MLflow call goes through
  ``tpgrpo/tracking.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "tpgrpo").rglob("*.py")) + sorted((ROOT / "flows").glob("*.py"))


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in ``path``, at any depth; ``import a.b`` gives ("a.b", [])."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def _project_modules(path: Path) -> set[str]:
    """The tpgrpo modules ``path`` imports (``from tpgrpo import world`` counts as tpgrpo.world)."""
    out = set()
    for module, names in _imports(path):
        if module == "tpgrpo":
            out.update(f"tpgrpo.{n}" for n in names)
        elif module.startswith("tpgrpo."):
            out.add(module)
    return out


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_no_module_imports_private_names() -> None:
    private = [
        f"{_rel(path)}: from {module} import {name}"
        for path in SOURCES
        for module, names in _imports(path)
        if module.startswith(("tpgrpo", "flows"))
        for name in names
        if name.startswith("_") and not (name.startswith("__") and name.endswith("__"))
    ]
    assert private == []


@pytest.mark.parametrize(
    "package, allowed",
    [
        ("models", ("tpgrpo.models", "tpgrpo.errors")),
        ("rewards", ("tpgrpo.rewards", "tpgrpo.errors", "tpgrpo.world", "tpgrpo.data", "tpgrpo.fileio")),
    ],
)
def test_models_and_rewards_import_nothing_above_them(package: str, allowed: tuple[str, ...]) -> None:
    above = {
        f"{_rel(path)} imports {module}"
        for path in sorted((ROOT / "tpgrpo" / package).rglob("*.py"))
        for module in _project_modules(path)
        if not any(module == a or module.startswith(a + ".") for a in allowed)
    }
    assert above == set()


@pytest.mark.parametrize("name", ["sde", "credit", "advantages", "loss"])
def test_the_algorithm_imports_only_torch(name: str) -> None:
    roots = {module.split(".")[0] for module, _ in _imports(ROOT / "tpgrpo" / f"{name}.py")}
    assert roots <= {"__future__", "dataclasses", "typing", "math", "torch"}, roots


def test_flows_hold_no_algorithm_and_no_polling() -> None:
    algorithm = {"tpgrpo.sde", "tpgrpo.credit", "tpgrpo.advantages", "tpgrpo.loss", "tpgrpo.update", "tpgrpo.rollout"}
    for path in sorted((ROOT / "flows").glob("*.py")):
        assert not (_project_modules(path) & algorithm), _rel(path)
        assert "torch" not in {module.split(".")[0] for module, _ in _imports(path)}, _rel(path)
        calls = {
            node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call)
        }
        assert "sleep" not in calls, f"{_rel(path)} polls"


def test_config_builds_nothing_and_mlflow_goes_through_tracking() -> None:
    config = {module.split(".")[0] for module, _ in _imports(ROOT / "tpgrpo" / "config.py")}
    assert "torch" not in config
    assert not any(m.startswith("tpgrpo.rewards") for m in _project_modules(ROOT / "tpgrpo" / "config.py") if m != "tpgrpo.rewards")
    # The schema only asks the registry for reward names; building a reward is rewards' job.
    from_rewards = {name for module, names in _imports(ROOT / "tpgrpo" / "config.py") if module == "tpgrpo.rewards" for name in names}
    assert from_rewards == {"available_rewards"}
    uses_mlflow = {_rel(path) for path in SOURCES if any(module.split(".")[0] == "mlflow" for module, _ in _imports(path))}
    assert uses_mlflow == {"tpgrpo/tracking.py"}
