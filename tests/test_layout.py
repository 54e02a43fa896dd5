"""Architecture kept true by tests: distribution lives in the training strategy only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_mtr"
DISTRIBUTED = ("torch.distributed", "torchrec.distributed")
ALLOWED = ("training", "distributed")  # the strategy that owns process groups, planning, DMP, checkpoints


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


CHECKED = sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[:2] != ALLOWED)


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_distributed_imports_outside_training(path):
    leaked = sorted(name for name in _imports(path) if name.startswith(DISTRIBUTED))
    assert not leaked, f"{path.relative_to(PACKAGE)} imports {leaked}; move it into lightning_mtr/training/distributed"


def test_policy_checks_the_training_package_but_not_the_strategy():
    checked = {str(p.relative_to(PACKAGE)) for p in CHECKED}
    assert "training/module.py" in checked and "training/distributed/strategy.py" not in checked
