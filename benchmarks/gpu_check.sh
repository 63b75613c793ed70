#!/usr/bin/env bash
# One shot on a GPU machine (H100/H200, no network): build the extension, run
# benchmarks/gpu_check.py within what is left of the wall-clock allowance, then
# tests/test_cuda.py. Logs and JSON go to $OUT.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh [more gpu_check.py options]
#
# WALL_S (default 480) is the whole run's allowance: the build takes what it
# takes (2 to 3 minutes on 16 cores), PYTEST_S (default 60) is kept for the
# tests and SLACK_S (default 30) for start-up and a last timing step that
# overruns; gpu_check.py gets the rest as --budget-s, at most 270 s.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu_check_out}
WALL_S=${WALL_S:-480}
PYTEST_S=${PYTEST_S:-60}
SLACK_S=${SLACK_S:-30}
export OUT PYTHONUNBUFFERED=1
mkdir -p "$OUT"
started=$SECONDS
elapsed() { echo $((SECONDS - started)); }

echo "== build ($(date -u +%FT%TZ)); log: $OUT/build.log"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
# No network: pip must neither look for packages nor for a newer pip.
MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index \
    --disable-pip-version-check -e . > "$OUT/build.log" 2>&1
build=$?
echo "build exit $build after $(elapsed) s"
if [ $build -ne 0 ]; then
    tail -n 60 "$OUT/build.log"
    exit $build
fi
"$PYTHON" -m torch_safebn info 2>&1 | tee "$OUT/info.log"

budget=$((WALL_S - $(elapsed) - PYTEST_S - SLACK_S))
[ $budget -gt 270 ] && budget=270
[ $budget -lt 60 ] && budget=60
echo "== gpu_check.py, budget $budget s; log: $OUT/gpu_check.log"
timeout --kill-after=10 $((budget + SLACK_S)) \
    "$PYTHON" benchmarks/gpu_check.py --device cuda --budget-s "$budget" --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
check=${PIPESTATUS[0]}

left=$((WALL_S - $(elapsed)))
[ $left -lt 30 ] && left=30
echo "== pytest tests/test_cuda.py, at most $left s; log: $OUT/pytest_cuda.log"
timeout --kill-after=10 "$left" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/pytest_cuda.log"
tests=${PIPESTATUS[0]}

echo "== build 0, gpu_check.py $check, pytest $tests (124: timed out); $(elapsed) s in all; results in $OUT"
[ $check -eq 0 ] && [ $tests -eq 0 ]
