#!/usr/bin/env bash
# Create the project virtualenv with the right torch / fbgemm build for this host.
#
# torchrec lists the CUDA `fbgemm-gpu` as a dependency, so a plain `pip install torchrec`
# on a CPU machine downloads gigabytes of CUDA wheels.  We therefore install torch first
# (pinned), then torchrec and the matching fbgemm build with --no-deps, then the package.
#
#   LMTR_VARIANT=cpu  (default when `nvidia-smi` is absent): torch 2.13.0 CPU + fbgemm-gpu-cpu
#   LMTR_VARIANT=cuda (default when `nvidia-smi` works):    torch 2.13.0 (CUDA) + fbgemm-gpu
#     PyPI's torch 2.13.0 brings CUDA 13.0 as pip wheels and fbgemm-gpu 1.8.0 links libcudart.so.13:
#     the host needs an NVIDIA driver for CUDA 13.0, no CUDA toolkit (docs/environment.md).
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}
torch_version=${LMTR_TORCH_VERSION:-2.13.0}
torchrec_version=${LMTR_TORCHREC_VERSION:-1.8.0}
fbgemm_version=${LMTR_FBGEMM_VERSION:-1.8.0}
if [ -z "${LMTR_VARIANT:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then LMTR_VARIANT=cuda; else LMTR_VARIANT=cpu; fi
fi
# PyPI's torch wheel for Linux is the CUDA build; the CPU build lives on PyTorch's own index.
# Use that index when it answers (a machine with a local wheel cache and no route to it,
# like our CI, takes torch from its configured pip sources instead).
torch_index=()
case "$LMTR_VARIANT" in
  cpu) fbgemm="fbgemm-gpu-cpu==$fbgemm_version"
       cpu_index=${LMTR_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
       if "$python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=5)" \
            "$cpu_index" 2>/dev/null; then
         torch_index=(--index-url "$cpu_index")
       fi ;;
  cuda) fbgemm="fbgemm-gpu==$fbgemm_version" ;;
  *) echo "LMTR_VARIANT must be cpu or cuda, got '$LMTR_VARIANT'" >&2; exit 2 ;;
esac
echo "setup_env: creating $venv ($LMTR_VARIANT: torch==$torch_version, $fbgemm, torchrec==$torchrec_version)"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip="$venv/bin/python -m pip --disable-pip-version-check -q"
$pip install "${torch_index[@]}" "torch==$torch_version"
$pip install --no-deps "$fbgemm" "torchrec==$torchrec_version"
# stop here, with one line, on a CPU torch in a CUDA venv or an fbgemm built for another torch
PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)" "$venv/bin/python" -W "ignore:Failed to initialize NumPy" \
  -m lightning_mtr.install_check "$LMTR_VARIANT"  # (numpy comes with the package, below)
# torch stays pinned while the rest resolves, so nothing upgrades it behind our back.
echo "torch==$torch_version" > "$venv/torch-pin.txt"
$pip install -c "$venv/torch-pin.txt" -e ".[test]"
touch "$venv/.installed"
