"""Architecture kept true by tests: distribution lives in the training strategy only; tests and
tools import the package, never the unpackaged tools/ folder."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_mtr"
DISTRIBUTED = ("torch.distributed", "torchrec.distributed")
# the strategy that owns process groups, planning, DMP, checkpoints and the tables' sharding hooks
ALLOWED = (("training", "distributed"),)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


CHECKED = sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[:2] not in ALLOWED)


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_distributed_imports_outside_training(path):
    leaked = sorted(name for name in _imports(path) if name.startswith(DISTRIBUTED))
    assert not leaked, f"{path.relative_to(PACKAGE)} imports {leaked}; move it into lightning_mtr/training/distributed"


def test_policy_checks_the_training_package_but_not_the_strategy():
    checked = {str(p.relative_to(PACKAGE)) for p in CHECKED}
    assert "training/module.py" in checked and "training/distributed/strategy.py" not in checked
    assert "embeddings/init.py" in checked and "training/distributed/sharding.py" not in checked


TESTS = Path(__file__).resolve().parent
TOOLS = PACKAGE.parent / "tools"


@pytest.mark.parametrize("path", sorted(TESTS.glob("*.py")), ids=lambda p: p.name)
def test_tests_import_the_package_not_the_tools_folder(path):
    """``tools/`` is not installed; what a test needs lives in the package (lightning_mtr.benchmarks)."""
    tools = sorted(name for name in _imports(path) if name == "tools" or name.startswith("tools."))
    assert not tools, f"tests/{path.name} imports {tools}; import it from lightning_mtr.benchmarks"


def test_every_tool_script_still_answers_its_command_line():
    """The docs' ``python tools/X.py`` and ``python -m tools.X`` commands: each script parses ``--help``
    (one process for all of them: importing torch once)."""
    scripts = sorted(p.stem for p in TOOLS.glob("*.py") if p.stem != "__init__")
    code = ("import runpy, sys\n"
            "for name in sys.argv[1:]:\n"
            "    sys.argv = [f'tools/{name}.py', '--help']\n"
            "    try:\n"
            "        runpy.run_module(f'tools.{name}', run_name='__main__')\n"
            "    except SystemExit as stop:\n"
            "        assert stop.code in (0, None), (name, stop.code)\n"
            "    else:\n"
            "        raise AssertionError(f'{name} --help did not exit')\n")
    result = subprocess.run([sys.executable, "-c", code, *scripts], cwd=PACKAGE.parent, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("usage:") == len(scripts) >= 7


def test_kernel_tests_and_their_benchmark_need_only_torch_and_triton():
    """A GPU host with torch and triton but without TorchRec or Lightning (the device we are lent
    has only those) collects the kernel tests, whose CUDA tiers it runs, and runs the kernel benchmark."""
    code = ("import runpy, sys\n"
            "class Absent:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.partition('.')[0] in ('torchrec', 'fbgemm_gpu', 'lightning', 'torchmetrics'):\n"
            "            raise ModuleNotFoundError(f'{name} is absent on this host')\n"
            "sys.meta_path.insert(0, Absent())\n"
            "sys.path[:0] = ['tests']\n"
            "import test_kernel_gate_mix, test_kernel_prob_chain\n"
            "sys.argv = ['tools/bench_kernels.py', '--help']\n"
            "try:\n"
            "    runpy.run_module('tools.bench_kernels', run_name='__main__')\n"
            "except SystemExit as stop:\n"
            "    assert stop.code in (0, None), stop.code\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
