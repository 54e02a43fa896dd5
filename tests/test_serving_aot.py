"""AOTInductor package + C++ client: scores from libtorch alone equal the exported program's.

The model is a toy with the exported ranking program's signature (dense [B, n_dense], flat values [N],
lengths [F, B]) -> named [B] probabilities, built from core aten ops only, so this checks the
compile/build/run path without depending on the exporter.
"""

import pytest
import torch
from torch import nn

from lightning_mtr.serving.aot import build_client, compile_aot, find_compiler, score_with_client

N_DENSE, N_FEATURES, ROWS, DIM = 3, 2, 50, 4
NAMES = ["ctr", "cvr"]


def has_compiler() -> bool:
    try:
        return bool(find_compiler())
    except RuntimeError:
        return False


class ToyRanker(nn.Module):
    """Sum-pooled embeddings of every sparse feature + log1p(dense) -> Linear -> sigmoid per task."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(ROWS, DIM)
        self.head = nn.Linear(N_DENSE + N_FEATURES * DIM, len(NAMES))

    def forward(self, dense, values, lengths):
        batch = dense.shape[0]
        bag = torch.arange(N_FEATURES * batch).repeat_interleave(lengths.reshape(-1), output_size=values.shape[0])
        pooled = torch.zeros(N_FEATURES * batch, DIM).index_add(0, bag, self.emb(values))
        pooled = pooled.reshape(N_FEATURES, batch, DIM).permute(1, 0, 2).reshape(batch, N_FEATURES * DIM)
        probs = torch.sigmoid(self.head(torch.cat([torch.log1p(dense), pooled], dim=1)))
        return {name: probs[:, t] for t, name in enumerate(NAMES)}


def make_batch(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (N_FEATURES, batch), generator=g)
    values = torch.randint(0, ROWS, (int(lengths.sum()),), generator=g)
    return torch.rand(batch, N_DENSE, generator=g) * 10, values, lengths


@pytest.fixture(scope="module")
def aot_setup(tmp_path_factory):
    torch.manual_seed(0)
    model = ToyRanker().eval()
    batch_dim = torch.export.Dim("batch", min=1, max=16384)
    n_values = torch.export.Dim("n_values", min=0, max=2**31 - 2)
    program = torch.export.export(
        model, make_batch(5, seed=0), dynamic_shapes=({0: batch_dim}, {0: n_values}, {1: batch_dim})
    )
    tmp = tmp_path_factory.mktemp("aot")
    package = compile_aot(program, tmp / "model.aoti.pt2")
    return program, package, build_client(tmp / "client")


@pytest.mark.slow
@pytest.mark.skipif(not has_compiler(), reason="no C++ compiler ($CXX, c++, g++ or clang++) to build the client")
@pytest.mark.parametrize("batch", [37, 1])
def test_cpp_client_scores_equal_exported_program(aot_setup, batch):
    program, package, exe = aot_setup
    inputs = make_batch(batch, seed=batch)
    expected = program.module()(*inputs)
    got, timing = score_with_client(exe, package, inputs, NAMES)
    assert f"batch {batch}," in timing
    for name in NAMES:
        assert got[name].shape == (batch,) and got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], expected[name].detach(), atol=1e-5, rtol=0)


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
