"""docs/multi-gpu.md is a map (STYLE.md section 13): the files it names exist, its YAML example
builds the strategy, and its commands use flags that exist. Nothing here starts processes;
tests/test_sharded_cli.py runs the commands themselves."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import yaml

from lightning_mtr.training.distributed import TableConstraints, TorchRecStrategy
from lightning_mtr.training.distributed.plan_tool import _parser

REPO = Path(__file__).resolve().parents[1]
SECTION = (REPO / "docs" / "multi-gpu.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", SECTION, re.S)
COMMANDS = [re.sub(r"\\\n\s*", "", body) for lang, body in BLOCKS if lang == "bash"]


def test_every_named_file_exists():
    named = set(re.findall(r"`((?:conf|lightning_mtr|tests)/[\w/.]+\.(?:py|yaml))`", SECTION))
    named |= {word for command in COMMANDS for word in command.split() if word.startswith("conf/")}
    assert named, "the page names no files"
    missing = sorted(p for p in named if not (REPO / p).is_file())
    assert not missing, f"docs/multi-gpu.md names files that do not exist: {missing}"


def test_yaml_example_builds_the_strategy():
    (example,) = [body for lang, body in BLOCKS if lang == "yaml" and "strategy" in body]
    strategy = yaml.safe_load(example)["trainer"]["strategy"]
    assert strategy["class_path"] == f"{TorchRecStrategy.__module__.rsplit('.', 1)[0]}.{TorchRecStrategy.__name__}"
    args = strategy["init_args"]
    assert set(args) <= set(inspect.signature(TorchRecStrategy).parameters)
    built = TorchRecStrategy(**args)
    assert all(isinstance(c, TableConstraints) for c in built.constraints.values())
    assert built.hbm_gb == 80 and built.ddr_gb == 512


def test_strategy_arguments_named_in_the_prose_exist():
    for name in ("constraints", "plan", "hbm_gb", "ddr_gb", "process_group_backend", "collective_timeout",
                 "start_method"):
        assert f"`{name}`" in SECTION or f"{name}:" in SECTION, name
        assert name in inspect.signature(TorchRecStrategy).parameters, name


@pytest.mark.parametrize("command", [c for c in COMMANDS if "lightning-mtr plan" in c])
def test_plan_command_parses(command):
    args = command.split("lightning-mtr plan", 1)[1].split("#")[0].split()
    parsed = _parser().parse_args(args)
    assert parsed.world_size == 64


def test_torchrun_and_slurm_lines_agree_with_lightning():
    """Lightning refuses devices x num_nodes != world size: the multi-node lines set both."""
    checked = 0
    for command in COMMANDS:
        for line in command.splitlines():
            # torchrun's sizes are on its own line; srun's come from the #SBATCH lines above it
            source = line if line.startswith("torchrun") else command if line.startswith("srun") else None
            nodes = source and re.search(r"--nnodes[ =](\d+)|--nodes=(\d+)", source)
            if nodes:
                per_node = re.search(r"--nproc_per_node[ =](\d+)|--ntasks-per-node=(\d+)", source)
                assert f"--trainer.num_nodes {next(filter(None, nodes.groups()))}" in line
                assert f"--trainer.devices {next(filter(None, per_node.groups()))}" in line
                checked += 1
    assert checked == 2, "one torchrun and one srun line"
