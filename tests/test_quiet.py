"""What ``lightning-mtr`` keeps off stderr (lightning_mtr/quiet.py): the warnings it knows to be
harmless, and the tracebacks of errors that are the user's to fix; not those of its own bugs, and
all of it with ``LMTR_DEBUG=1``. The 2-process run's stderr is checked in tests/test_sharded_cli.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pytest

from lightning_mtr import quiet
from lightning_mtr.cli import main
from lightning_mtr.data.encode import DataError
from lightning_mtr.models.mmoe import MMoE
from test_fault_corpus import MODEL, _config

REPO = Path(__file__).resolve().parents[1]
# what every one-process fit printed before: the three, DCP's note on a checkpoint saved
# without a process group, and Lightning's on a stream with a length (reader.py hid it on import);
# Lightning's litmodels tip comes with its default ModelCheckpoint, which the CLI replaces
ONE_PROCESS = ("💡 Tip: For seamless cloud logging", "`isinstance(treespec, LeafSpec)` is deprecated",
               "is_fx_tracing will return true for both",
               "torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to save",
               "Your `IterableDataset` has `__len__` defined")


def test_a_fit_prints_none_of_the_known_warnings_unless_debugging(tmp_path):
    """The same tiny fit twice, as separate processes: quiet, with no warning of a library's and no
    tip (Lightning's own advice, printed without a category, stays), then with LMTR_DEBUG=1, which
    must show the one-process warnings (so the filters match what the libraries really print)."""
    runs = {}
    for name, debug in (("quiet", {}), ("debug", {quiet.DEBUG: "1"})):
        (tmp_path / name).mkdir()
        config = _config(tmp_path / name, MODEL)
        env = {**{k: v for k, v in os.environ.items() if k != quiet.DEBUG}, **debug, "PYTHONPATH": str(REPO),
               "OMP_NUM_THREADS": "1"}
        runs[name] = subprocess.Popen([sys.executable, "-m", "lightning_mtr.cli", "fit", "--config", str(config)],
                                      cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True)
    stderr = {name: run.communicate(timeout=300)[1] for name, run in runs.items()}
    assert {name: run.returncode for name, run in runs.items()} == {"quiet": 0, "debug": 0}, stderr
    known = [message for _, message, _ in (*quiet.WARNINGS, *quiet.LOGS)]
    assert [m for m in known if m in stderr["quiet"]] == [], stderr["quiet"]
    assert re.findall(r"\w+Warning: .*|💡 Tip.*", stderr["quiet"]) == [], stderr["quiet"]
    assert all(message in stderr["debug"] for message in ONE_PROCESS), stderr["debug"]


def test_every_silenced_message_says_why():
    for category, message, why in quiet.WARNINGS:
        assert issubclass(category, Warning) and len(message) > 20 and len(why) > 20, message
    for logger, message, why in quiet.LOGS:
        assert logger and len(message) > 20 and len(why) > 20, message


def test_debugging_silences_nothing(monkeypatch):
    monkeypatch.setenv(quiet.DEBUG, "1")
    with warnings.catch_warnings():
        before = list(warnings.filters)
        quiet.install()
        assert warnings.filters == before


def test_an_error_in_the_users_input_shows_its_traceback_when_debugging(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-mtr"])
    config = _config(tmp_path, MODEL)
    missing = ["fit", "--config", str(config), "--data.schema", str(tmp_path / "missing.yaml")]
    assert main(missing) == 2
    monkeypatch.setenv(quiet.DEBUG, "1")
    with pytest.raises(DataError, match="missing.yaml") as raised:
        main(missing)
    assert "Schema.from_yaml" in "".join(traceback.format_exception(raised.value))  # where the schema failed


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """A ValueError raised by a library while the model is built (here: a model that parses bad
    JSON) is not the user's config to fix: it propagates, where a console script prints it whole."""

    def broken(self, *args, **kwargs):
        json.loads("{")

    monkeypatch.setattr(sys, "argv", ["lightning-mtr"])
    monkeypatch.setattr(MMoE, "__init__", broken)
    with pytest.raises(json.JSONDecodeError):
        main(["fit", "--config", str(_config(tmp_path, MODEL))])
    assert "lightning-mtr: error" not in capsys.readouterr().err


def test_a_bug_inside_lightning_mtr_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """A ValueError that Python raises in lightning-mtr's own code is a bug too, not a check: here
    a model that gives a task weight as text, which MultiTaskModule's info line formats with
    ``:g`` (module.py). It was printed as one line naming the config, as if the user could fix it."""
    monkeypatch.setattr(sys, "argv", ["lightning-mtr"])
    with pytest.raises(ValueError, match="Unknown format code 'g'"):
        main(["fit", "--config", str(_config(tmp_path, {**MODEL, "class_path": "helpers.TextWeightMMoE"}))])
    assert "lightning-mtr: error" not in capsys.readouterr().err
