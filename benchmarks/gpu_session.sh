#!/usr/bin/env bash
# One prepared device run for a session that is lent a GPU (see DEVELOPERS' guide): the CUDA
# tests, the full benchmark suite and this device's section of benchmarks/RESULTS.md, with every
# log and the JSON under $OUT (or /tmp/bytheway_gpu). About 6-8 minutes on an H100/H200.
#
# The device image has torch, triton, pytest and pytest-benchmark but not diffusers: for the layer
# and denoiser benchmarks, first download its wheel here (repo root) and carry `.whl`:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata zipp
# then: run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
# and copy the returned RESULTS.md over benchmarks/RESULTS.md (it keeps the other devices' sections).
set -uo pipefail
out=${OUT:-/tmp/bytheway_gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  | tee "$out/versions.txt"
status=0
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_triton_sm90.py 2>&1 \
  | tee "$out/gpu_tests.log" || status=1
timeout 420 python3 -m pytest -q -p no:cacheprovider benchmarks --benchmark-only \
  --benchmark-json="$out/bench_gpu.json" 2>&1 | tee "$out/bench.log" || status=1
python3 benchmarks/make_results.py "$out/bench_gpu.json" && cp benchmarks/RESULTS.md "$out/RESULTS.md"
exit $status
