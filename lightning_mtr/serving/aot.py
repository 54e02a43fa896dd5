"""AOTInductor path of `lightning-mtr export --aot`: a CPU package a C++ program runs with libtorch.

`compile_aot` turns the exported program into `model.aoti.pt2`; `build_client` compiles the shipped
C++ client (`client/score_client.cpp`) against the libtorch inside the torch wheel, and
`score_with_client` runs it, so that a test (and a user) can check C++ scores against Python's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

CLIENT_SOURCE = Path(__file__).parent / "client" / "score_client.cpp"
_COMPILERS = ("c++", "g++", "clang++")


def compile_aot(program: torch.export.ExportedProgram, path: Path) -> Path:
    """Compile `program` for CPU into an AOTInductor package at `path` (must end in `.pt2`).

    The symbolic batch and flat-values sizes of `program` stay symbolic in the compiled code, so one
    package serves every batch size the export allowed.
    """
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"AOTInductor package path {path} must end in .pt2 (e.g. DIR/model.aoti.pt2)")
    path.parent.mkdir(parents=True, exist_ok=True)
    # the client checks inputs at run time (AOTI_RUNTIME_CHECK_INPUTS); the batch may be 1, below
    # the lower bound of 2 that check would otherwise apply to a dynamic size
    options = {"aot_inductor.check_lowerbound": False}
    return Path(torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=options))


def find_compiler() -> str:
    """The C++ compiler: $CXX if set, else the first of c++, g++, clang++ on PATH."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else list(_COMPILERS)
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError(
        f"no C++ compiler found (looked for {', '.join(names)} on PATH): the AOTInductor client needs "
        "one with C++20; install it (e.g. `apt-get install g++`) or set CXX to its path"
    )


def client_command(compiler: str, source: Path, exe: Path) -> list[str]:
    """The compile-and-link command for the client against the torch wheel's libtorch."""
    from torch.utils import cpp_extension

    abi = int(torch.compiled_with_cxx11_abi())
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = cpp_extension.library_paths()
    return [
        compiler, "-std=c++20", "-O2", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, str(source),
        "-o", str(exe), *[f"-L{p}" for p in libs], *[f"-Wl,-rpath,{p}" for p in libs],
        "-ltorch", "-ltorch_cpu", "-lc10",
    ]  # fmt: skip


def build_client(workdir: Path) -> Path:
    """Compile `score_client.cpp` into `workdir/score_client`; rpath makes it run without LD_LIBRARY_PATH."""
    from torch.utils import cpp_extension

    header = "torch/csrc/inductor/aoti_package/model_package_loader.h"
    if not any((Path(p) / header).exists() for p in cpp_extension.include_paths()):
        raise RuntimeError(
            f"torch {torch.__version__} ships no {header}: the AOTInductor client needs a torch wheel with its "
            "C++ headers (the PyPI wheels of torch >= 2.6 have them)"
        )
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    exe = workdir / "score_client"
    cmd = client_command(find_compiler(), CLIENT_SOURCE, exe)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building the C++ client failed:\n{' '.join(cmd)}\n{done.stderr[-4000:]}")
    return exe


def score_with_client(
    exe: Path, package: Path, inputs: tuple[torch.Tensor, ...], names: list[str], repeats: int = 0
) -> tuple[dict[str, torch.Tensor], str]:
    """Run the C++ client on `inputs`; returns the outputs by name and the client's timing line."""
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(tuple(t.contiguous() for t in inputs), Path(tmp) / "inputs.pt")
        out_file = Path(tmp) / "outputs.pt"
        cmd = [str(exe), str(package), str(Path(tmp) / "inputs.pt"), str(out_file), str(repeats)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"C++ client failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
        outputs = torch.load(out_file, weights_only=True)
    if len(outputs) != len(names):
        raise RuntimeError(f"C++ client wrote {len(outputs)} outputs, expected {len(names)} ({', '.join(names)})")
    return dict(zip(names, outputs)), done.stdout.strip()
