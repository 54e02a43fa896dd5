"""The AOTInductor helpers' refusals (the C++ client's parity with Python runs on a real exported
artifact in tests/test_serving_cli.py)."""

import pytest

from lightning_mtr.serving.aot import build_client, compile_aot, find_compiler


def test_build_client_without_compiler_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no compiler on PATH
    with pytest.raises(RuntimeError, match=r"no C\+\+ compiler found \(looked for c\+\+, g\+\+, clang\+\+"):
        build_client(tmp_path / "client")
    monkeypatch.setenv("CXX", "my-missing-cxx")
    with pytest.raises(RuntimeError, match="looked for my-missing-cxx"):
        find_compiler()


def test_compile_aot_refuses_a_path_without_pt2(tmp_path):
    with pytest.raises(ValueError, match=r"must end in \.pt2"):
        compile_aot(None, tmp_path / "model.so")
