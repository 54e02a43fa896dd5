"""The precision policy (lightning_mtr/training/precision.py): bf16 units detected from torch's
capabilities or /proc/cpuinfo (flags faked both ways), ``precision: auto``, and the line every
``lightning-mtr`` run starts with, through the real CLI."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import pytest
import torch

from lightning_mtr.cli import MultiTaskCLI
from lightning_mtr.tasks import masked_task_losses
from lightning_mtr.training import precision
from lightning_mtr.training.distributed.checkpoint import read_full
from lightning_mtr.training.distributed.single import fused_state
from lightning_mtr.training.precision import bf16_units, cpu_bf16_units, precision_line, resolve
from lightning_mtr.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
AVX512_ONLY = {"avx512_f": True, "avx512_bw": True, "avx512_bf16": False}


@pytest.mark.parametrize(("capabilities", "units"), [
    ({**AVX512_ONLY, "avx512_bf16": True}, "AVX-512 BF16"),
    ({"avx512_bf16": True, "amx_tile": True, "amx_bf16": True}, "AMX BF16"),  # the faster units win
    ({"avx512_bf16": True, "amx_tile": True, "amx_bf16": False}, "AVX-512 BF16"),  # tiles without bf16 math
    ({"architecture": "aarch64", "neon": True, "bf16": True}, "Arm BF16"),
    ({"architecture": "aarch64", "sve": True, "sve_bf16": True, "bf16": True}, "SVE BF16"),
    (AVX512_ONLY, None),  # AVX-512 alone: oneDNN emulates bf16 through fp32
    ({"architecture": "aarch64", "neon": True, "bf16": False}, None),
    ({}, None),
])
def test_cpu_units_from_capabilities(capabilities, units):
    assert cpu_bf16_units(capabilities) == units


def test_this_cpu_is_read_through_torch(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    assert cpu_bf16_units() == "AVX-512 BF16"
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(AVX512_ONLY))
    assert cpu_bf16_units() is None


@pytest.mark.parametrize(("cpuinfo", "units"), [
    ("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n", "AVX-512 BF16"),
    ("processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n", "AMX BF16"),
    ("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n", None),
    ("processor\t: 0\nFeatures\t: fp asimd sve bf16\n", "Arm BF16"),
    ("processor\t: 0\nFeatures\t: fp asimd sve\n", None),
])
def test_without_torch_capabilities_proc_cpuinfo_answers(monkeypatch, tmp_path, cpuinfo, units):
    def missing():
        raise AttributeError("module 'torch.cpu' has no attribute 'get_capabilities'")

    monkeypatch.setattr(torch.cpu, "get_capabilities", missing)
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    monkeypatch.setattr(precision, "CPUINFO", tmp_path / "cpuinfo")
    assert cpu_bf16_units() == units
    monkeypatch.setattr(precision, "CPUINFO", tmp_path / "absent")  # not Linux: no units claimed
    assert cpu_bf16_units() is None


def test_a_gpu_counts_from_compute_capability_8_not_emulation(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True:
                        asked.append(including_emulation) or not including_emulation)
    assert bf16_units("cuda") == "bf16 tensor cores" and asked == [False]
    assert precision_line("auto", "bf16-mixed", "cuda") == "precision bf16-mixed (auto): this GPU has bf16 tensor cores"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert bf16_units("cuda") is None
    assert precision_line(None, "32-true", "cuda") == "precision 32-true (the default)"
    assert bf16_units("mps") is None


@pytest.fixture(params=[True, False], ids=["bf16_units", "no_bf16_units"])
def units(request, monkeypatch):
    """This CPU with and without bf16 units, whatever the machine running the test has."""
    flags = {"avx512_f": True, "avx512_bf16": request.param}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: flags)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return request.param


def test_auto_is_bf16_only_where_there_are_units(units):
    expected = "bf16-mixed" if units else "32-true"
    assert resolve("auto", "cpu") == expected
    assert resolve("auto", "auto") == expected  # no GPU: the CPU
    assert resolve("auto", "mps") == "32-true"
    assert Trainer(precision="auto", accelerator="cpu", logger=False).precision == expected
    for given in (None, "32-true", "bf16-mixed", 16):
        assert resolve(given, "cpu") == given


def test_precision_lines(units):
    if units:
        assert precision_line(None, "32-true", "cpu") == ("precision 32-true (the default); this CPU has AVX-512 "
                                                          "BF16 units: --trainer.precision bf16-mixed trains faster")
        units_line = "this CPU has AVX-512 BF16 units"
        assert precision_line("auto", "bf16-mixed", "cpu") == f"precision bf16-mixed (auto): {units_line}"
        assert precision_line("bf16-mixed", "bf16-mixed", "cpu") == f"precision bf16-mixed: {units_line}"
    else:
        assert precision_line(None, "32-true", "cpu") == "precision 32-true (the default)"
        assert precision_line("32", "32-true", "cpu") == "precision 32-true (as configured)"
        assert precision_line("auto", "32-true", "cpu") == ("precision 32-true (auto): this CPU has no bf16 units, so "
                                                            "bf16 would be emulated and slower")
        assert precision_line("bf16", "bf16-mixed", "cpu") == (
            "precision bf16-mixed: this CPU has no bf16 units, so bf16 is emulated through fp32 and trains slower "
            "than 32-true; running it as asked")


@pytest.mark.parametrize("asked", [None, "auto", "bf16-mixed"])
def test_the_cli_says_which_precision_runs_and_why(tmp_path, monkeypatch, units, asked):
    """Through the real CLI: the Trainer gets the resolved precision, and its line is logged once."""
    monkeypatch.chdir(REPO)
    args = ["--config", "conf/debug.yaml", "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
            "--data.synthetic.cache_dir", str(tmp_path / "cache"), *(["--trainer.precision", asked] if asked else [])]
    with _lightning_log() as log:
        cli = MultiTaskCLI(args=args, run=False)
    runs = "bf16-mixed" if asked == "bf16-mixed" or (asked == "auto" and units) else "32-true"
    assert cli.trainer.precision == runs
    lines = [line for line in log.getvalue().splitlines() if line.startswith("lightning-mtr: precision")]
    assert lines == [f"lightning-mtr: {precision_line(asked, runs, 'cpu')}"]
    assert ("AVX-512 BF16" in lines[0]) == units


@contextlib.contextmanager
def _lightning_log():
    """The ``lightning.pytorch`` log at INFO, whatever handlers pytest installed."""
    text, logger = io.StringIO(), logging.getLogger("lightning.pytorch")
    handler, level = logging.StreamHandler(text), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield text
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_bf16_mixed_keeps_tables_optimizer_state_checkpoints_losses_metrics_and_scores_fp32(tmp_path, monkeypatch):
    """Under bf16-mixed only the dense layers' math is bf16: tables, both optimizers' state and the
    checkpoint stay fp32, the loss is the fp32 loss of the bf16 logits, metrics and scores get fp32."""
    monkeypatch.chdir(REPO)
    cli = MultiTaskCLI(args=["--config", "conf/debug.yaml", "--trainer.default_root_dir", str(tmp_path),
                             "--trainer.logger", "false", "--data.synthetic.cache_dir", str(tmp_path / "cache"),
                             "--data.synthetic.train_rows", "2048", "--data.synthetic.val_rows", "1024",
                             "--data.synthetic.test_rows", "1024", "--data.batch_size", "512",
                             "--trainer.precision", "bf16-mixed", "--trainer.max_epochs", "1"], run=False)
    module, data, trainer = cli.model, cli.datamodule, cli.trainer
    trainer.fit(module, datamodule=data)
    weights = module.model.state_dict()
    assert any("embedding_bags" in name for name in weights)
    assert _float_dtypes(weights) == {torch.float32}
    assert _float_dtypes(fused_state(module.model).state) == {torch.float32}  # the fused tables' momentum
    assert _float_dtypes(trainer.optimizers[0].state) == {torch.float32}  # dense Adam's moments
    saved = read_full(tmp_path / "checkpoints" / "last.ckpt")
    assert any("embedding_bags" in name for name in saved["model"])
    assert _float_dtypes(saved) == {torch.float32}

    batch = next(iter(data.val_dataloader()))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, losses, _ = module.outputs_and_losses(batch)
    assert {v.dtype for v in logits.values()} == {torch.bfloat16}  # the model did run in bf16
    fp32 = masked_task_losses({k: v.float() for k, v in logits.items()}, batch.labels, batch.masks, module.schema.tasks)
    for task, loss in losses.items():
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, fp32[task], rtol=0, atol=0, msg=task)

    seen = []
    update = module.metrics["val"].update
    monkeypatch.setattr(module.metrics["val"], "update",
                        lambda scores, *args: seen.append({v.dtype for v in scores.values()}) or update(scores, *args))
    trainer.validate(module, datamodule=data)
    assert seen and all(dtypes == {torch.float32} for dtypes in seen)
    data.paths["predict"] = data.paths["test"]
    batches = trainer.predict(module, datamodule=data, return_predictions=True)
    assert {v.dtype for b in batches for k, v in b.items() if k.startswith("score_")} == {torch.float32}


def _float_dtypes(tree) -> set[torch.dtype]:
    """The dtypes of every floating-point tensor in nested dicts (a state dict, optimizer state)."""
    if isinstance(tree, torch.Tensor):
        return {tree.dtype} if tree.is_floating_point() else set()
    values = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, list | tuple) else ()
    return set().union(*(_float_dtypes(v) for v in values))
