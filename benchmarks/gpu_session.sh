#!/usr/bin/env bash
# One prepared device run for a session that is lent a GPU: the GPU quick check of the fused
# temporal attention, its kernel times (with the tile, energy-form and energy-program sweeps),
# the map op's kernel times, the host cost per call split four ways (benchmarks/host_cost.py),
# the CUDA tests (direct launcher, the default), the benchmark suite (kernel time, host per call,
# wall, peak memory), and this device's section of benchmarks/RESULTS.md. Every step is independent (one failing or
# timing out does not stop the others) and the whole run ends within BYTHEWAY_GPU_BUDGET_S seconds
# (default 530, for a device call of timeout_s=600). About 7-9 minutes on an H100/H200; give it
# BYTHEWAY_GPU_BUDGET_S=590 when the whole session's device time is for it (no second call).
#
# The device image has torch 2.11, triton 3.6.0, numpy, pytest, pytest-benchmark and what diffusers
# 0.42.1 imports (huggingface-hub 1.33 >= 1.32, safetensors 0.8, regex, requests, filelock, pillow,
# and hub's httpx, hf-xet, pyyaml, tqdm, fsspec, packaging, typing-extensions), but not diffusers
# (needed by the layer and denoiser benchmarks) nor importlib_metadata (a diffusers requirement;
# zipp is carried with it in case the image's is older than it needs). Before the call, in the
# repository root on the CPU machine (all three are pure-Python wheels):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 importlib_metadata==10.2.0 zipp==4.1.2
#   (check a wheel's needs with: unzip -p .whl/diffusers-*.whl '*/METADATA' | grep ^Requires-Dist)
# then: run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
# BYTHEWAY_GPU_SKIP="step names" skips those steps (e.g. "fused_kernel_times", about 180 s, when
# the fused kernels did not change since the last run recorded in benchmarks/results/).
# It writes to $OUT (or /tmp/bytheway_gpu) four files: summary.txt (each step's status and time),
# RESULTS.md (the repo's, with this device's section replaced by this run's, without notes: a
# preview; to record the run, copy bench_gpu.json to benchmarks/results/, write its notes and run
# `python benchmarks/make_results.py THAT.json --notes NOTES.md` here, which also keeps a
# partial run from passing for a whole one unremarked), bench_gpu.json (the merged
# pytest-benchmark data of the parts that finished) and logs.tgz (every log and per-part JSON).
set -u
out=${OUT:-/tmp/bytheway_gpu}
budget=${BYTHEWAY_GPU_BUDGET_S:-530}
reserve=25  # seconds kept for make_results.py and packing
logs=$(mktemp -d)
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$logs/wheels.log" 2>&1 && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

# step NAME MAX_SECONDS COMMAND...: run COMMAND with a timeout of MAX_SECONDS, or less where the
# budget (minus the reserve) has less left; log to $logs/NAME.log and a line to summary.txt.
step() {
  local name=$1 limit=$2
  shift 2
  if [[ " ${BYTHEWAY_GPU_SKIP:-} " == *" $name "* ]]; then
    echo "$name: skipped (BYTHEWAY_GPU_SKIP)" | tee -a "$logs/summary.txt"
    return
  fi
  local left=$((budget - reserve - SECONDS))
  ((left < limit)) && limit=$left
  if ((limit < 15)); then
    echo "$name: skipped, budget spent" | tee -a "$logs/summary.txt"
    return
  fi
  local began=$SECONDS
  timeout -k 5 "$limit" "$@" > "$logs/$name.log" 2>&1
  local rc=$?
  local verdict="exit $rc"
  ((rc == 124 || rc == 137)) && verdict="TIMED OUT after ${limit}s"
  echo "$name: $verdict, $((SECONDS - began))s: $(tail -n 1 "$logs/$name.log")" | tee -a "$logs/summary.txt"
  cp "$logs/summary.txt" "$out/summary.txt"  # back even if the packing at the end runs out of time
}

step versions 30 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader;
  python3 -c "import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__)";
  python3 -c "import diffusers; print(\"diffusers\", diffusers.__version__)";
  python3 -m pip list 2>/dev/null | grep -i -E "^(pytest|pytest-benchmark|huggingface|importlib)"'
cat "$logs/versions.log"

# Most important first: the quick checks that measure the issues' kernel targets and split the
# host cost (Triton's launch path, the direct launcher, our Python alone), the CUDA tests (the
# direct launcher is the default: each signature's first launch goes through Triton, the rest
# direct, so both paths run; a cold compile of every test variant took over 130 s on an H200,
# the quick checks warm Triton's cache first), then the benchmark suite in parts (each with its
# own JSON: a part that times out loses only its own numbers), which gets the time left. The
# sm_90 compile tests need no GPU and run in CI instead. fp16 only: the dtype AnimateDiff runs
# in and the issues' targets use.
if [[ -f benchmarks/temporal_attention_gpu_check.py ]]; then
  step ta_gpu_check 100 python3 benchmarks/temporal_attention_gpu_check.py
fi
if [[ -f benchmarks/fused_kernel_times.py ]]; then  # profiler: fused kernel device times, no launch gaps
  step fused_kernel_times 180 python3 benchmarks/fused_kernel_times.py
fi
if [[ -f benchmarks/map_op_kernel_times.py ]]; then  # profiler: the map op's kernel and host times,
  # then the adaptive call plain or as a programmatic dependent pair (CUDA events), its apply
  # kernel's tiles at F = 24 / 32 (see the script), its stats pass on full or half tiles there,
  # and its stats pass at 1, 2, 4 and 8 tiles per program (one wave or several)
  step map_kernel_times 130 python3 benchmarks/map_op_kernel_times.py
fi
# host per call: Triton's path / direct (pointers as ints, the default since 2026-11-27) /
# direct handing over the tensors (as before: the C launcher's data_ptr() and cuPointerGetAttribute
# per tensor) / our Python; map_op_kernel_times.py and temporal_attention_gpu_check.py print the same
step host_cost 30 python3 benchmarks/host_cost.py
# The CUDA tests before the suite, on 8 pytest-xdist workers (the image has pytest-xdist; a cold
# compile of every variant took over 130 s in one process). The last full GPU run was H200
# session 7 (2026-11-27, at 08058a9, with BYTHEWAY_GPU_SKIP=fused_kernel_times: 462 s of a 560 s
# budget; the fused kernels' profiler sweep last ran in session 6), and a second call at 0ff5f66
# timed the map op's prepared eager calls (benchmarks/results/h200-2026-11-27-session7.notes.md).
# Changed since: the prepared calls check the band product and are forgotten with the launch
# plans (`clear_launch_plans`), which makes map_kernel_times' variant and sweep rows valid again
# (void in that second call); at F = 24 / 32 the map op holds one row per thread and takes the
# band's frequencies in both passes (untimed: map_kernel_times prints them beside the rank-one
# terms on tiles, "r1", whose stats pass it times on full against half tiles); the adaptive
# call's kernels can be a programmatic dependent pair (off by default: map_kernel_times times it,
# and test_programmatic_dependent_pair in gpu_tests checks it). Without the skip the steps took 516 s in session 6:
# BYTHEWAY_GPU_BUDGET_S=590 gives the layer part room, where no second device call is planned
# (a 15-minute session then has too little left to start another machine).
# (two pytest runs: the step fails if either does, and the op tests' summary line is in summary.txt)
step gpu_tests 240 bash -c 'python3 -m pytest -q -p no:cacheprovider -rfEs -n 8 \
  tests/test_attention_probs_gpu.py tests/test_temporal_attention_gpu.py; status=$?
  python3 -m pytest -q -p no:cacheprovider -rfEs \
  tests/test_integration_fused.py -k cuda || status=$?; exit $status'
grep -E "(passed|failed).* in [0-9.]+s" "$logs/gpu_tests.log" 2>/dev/null | head -n 1 \
  | sed 's/^/  op tests: /' | tee -a "$logs/summary.txt"

bench=(python3 -m pytest -q -p no:cacheprovider -rfEs --benchmark-only --bench-dtype=float16
       --benchmark-max-time=0.02 --benchmark-min-rounds=10 --benchmark-warmup=on --benchmark-warmup-iterations=2)
step bench_denoiser 130 "${bench[@]}" benchmarks/test_denoiser.py --benchmark-json="$logs/bench_denoiser.json"
step bench_attention 100 "${bench[@]}" benchmarks/test_temporal_attention.py --benchmark-json="$logs/bench_attention.json"
step bench_map 120 "${bench[@]}" benchmarks/test_attention_probs.py --benchmark-json="$logs/bench_map.json"
step bench_layer 50 "${bench[@]}" benchmarks/test_layer.py --benchmark-json="$logs/bench_layer.json"

# the parts that finished (pytest-benchmark writes its JSON at the end: a part that timed out
# leaves an empty file, which must not stop the others' merge)
parts=$(for part in "$logs"/bench_*.json; do
  python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$part" 2>/dev/null && echo "$part"
done)
if [[ -n $parts ]]; then
  timeout 20 python3 - "$out/bench_gpu.json" $parts > "$logs/merge.log" 2>&1 <<'EOF'
import json, sys
sys.path.insert(0, "benchmarks")
from make_results import merge_runs
runs = [json.load(open(path)) for path in sys.argv[2:]]
json.dump(merge_runs(runs), open(sys.argv[1], "w"))
EOF
  timeout 20 python3 benchmarks/make_results.py $parts > "$logs/make_results.log" 2>&1 \
    && cp benchmarks/RESULTS.md "$out/RESULTS.md"
  tail -n 1 "$logs/make_results.log" | tee -a "$logs/summary.txt"
  # The targets, last in the output (the device call returns its tail).
  timeout 20 python3 - "$out/bench_gpu.json" <<'EOF' 2>&1 | tee "$logs/targets.txt"
import json, sys
sys.path.insert(0, "benchmarks")
import make_results
run = json.load(open(sys.argv[1]))
info = run["machine_info"]["bytheway"]
groups = make_results.groups_of(run["benchmarks"])
for row in make_results.target_rows(groups, info["device_type"] == "cuda", info["copy_bandwidth_bytes_per_s"]):
    print(" | ".join(row))
EOF
fi
cp "$logs/summary.txt" "$out/summary.txt"
tar -C "$logs" -czf "$out/logs.tgz" .
echo "total ${SECONDS}s of a ${budget}s budget"
