"""Run ``lightning-mtr`` command lines as separate processes, paying for the imports once.

``python tests/fault_driver.py CASES.json`` imports the CLI, then forks one child per case
(``{"name": [argv...]}``): the child runs ``lightning_mtr.cli.main(argv)`` exactly as the
console entry does (an uncaught exception prints its traceback and exits 1) with its stderr in a
file, and the parent prints ``{"name": {"status": ..., "stderr": ...}}`` as JSON. Two children
run at a time. Used by tests/test_fault_corpus.py: dozens of CLI processes in seconds.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from pathlib import Path


def _child(argv: list[str], stderr: Path) -> None:
    """The body of ``python -m lightning_mtr.cli ARGV`` with stderr to a file; never returns."""
    fd = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    sys.stdout = open(os.devnull, "w")
    from lightning_mtr.cli import main

    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # noqa: BLE001 (what the interpreter does with an uncaught exception)
        traceback.print_exc()
        status = 1
    sys.stderr.flush()
    os._exit(status or 0)


def run(cases: dict[str, list[str]], parallel: int = 2) -> dict[str, dict]:
    import lightning_mtr.cli  # noqa: F401 (imported once, before forking)

    results, running = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        pending = list(cases.items())
        while pending or running:
            while pending and len(running) < parallel:
                name, argv = pending.pop(0)
                stderr = Path(scratch) / f"{len(results) + len(running)}.err"
                pid = os.fork()
                if pid == 0:
                    _child(argv, stderr)
                running[pid] = (name, stderr)
            pid, wait_status = os.wait()
            name, stderr = running.pop(pid)
            results[name] = {"status": os.waitstatus_to_exitcode(wait_status), "stderr": stderr.read_text()}
    return results


if __name__ == "__main__":
    print(json.dumps(run(json.loads(Path(sys.argv[1]).read_text()))))
