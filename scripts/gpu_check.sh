#!/usr/bin/env bash
# The GPU check, for a machine with one GPU after the README's set-up (the torch build for its CUDA in .venv): in at
# most 8 minutes, the CUDA tests (pytest -m cuda tests/gpu), then the table of step times and peak GPU memory at the
# paper's full shapes (benchmarks/gpu_steps.py: teacher step, extraction views/s, BEVDet-R50, BEVDepth4D and
# BEVFormer, baseline vs cached vs online), written to a markdown file with the tests' outcome.
#
# Usage: bash scripts/gpu_check.sh [--out FILE]          (default out/gpu_check.md)
#        bash scripts/gpu_check.sh --dry-run [--out FILE]  (default out/gpu_check_dry_run.md)
#        PYTHON=/path/to/python bash scripts/gpu_check.sh  (default .venv/bin/python)
#
# --dry-run is the self-check for a machine without a GPU (any GPU is hidden from it): the CUDA tests are collected
# and every one must skip with its reason, then benchmarks/gpu_steps.py runs at the small synthetic shapes on the
# CPU, one step per row. Without --dry-run the script refuses when torch sees no CUDA device.
#
# It installs nothing. Each part runs under `timeout` (tests 240 s, table 210 s: 7.5 min with the device check); the
# table starts no row after 150 s and lists the rows it left out, and every row it finished is in the file even when
# the limit cuts it short. Exit status: 0 when the tests passed and every row ran or ran out of memory (the table
# says which), 1 when a test or a row failed, 2 when there is no CUDA device or no venv, 124 when a part hit its limit.
set -uo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO_ROOT/.venv/bin/python}"
TESTS_LIMIT_S=240
TABLE_LIMIT_S=210
TABLE_ROW_BUDGET_S=150
DRY_RUN=0
OUT=""

usage() { sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --out) [ $# -ge 2 ] || { echo "gpu_check: --out needs a file name" >&2; exit 2; }; OUT="$2"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

cd "$REPO_ROOT"
if [ ! -x "$PYTHON" ]; then
    echo "gpu_check: no Python at $PYTHON: run the README's set-up first (make venv; on a CUDA machine install the" \
         "torch build for your CUDA before the package), or set PYTHON=" >&2
    exit 2
fi
if [ -z "$OUT" ]; then
    if [ "$DRY_RUN" = 1 ]; then OUT="out/gpu_check_dry_run.md"; else OUT="out/gpu_check.md"; fi
fi
mkdir -p "$(dirname "$OUT")"
TESTS_LOG="${OUT%.md}_tests.log"
START=$SECONDS

# The tests' outcome, appended to the table's file: pytest's summary line and any failure lines.
append_tests() {  # $1: pytest's exit status
    local summary
    summary="$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|deselected|error)' "$TESTS_LOG" | tail -n 1 \
        | sed 's/=//g')"
    [ -n "$summary" ] || summary="no summary (see the log)"
    {
        echo
        echo "## CUDA tests"
        echo
        if [ "$1" = 124 ] || [ "$1" = 137 ]; then
            echo "\`pytest -m cuda tests/gpu\`: stopped at the ${TESTS_LIMIT_S} s limit; ${summary} (log: $TESTS_LOG)"
        else
            echo "\`pytest -m cuda tests/gpu\`: ${summary# } (exit status $1; log: $TESTS_LOG)"
        fi
        grep -E '^(FAILED|ERROR) ' "$TESTS_LOG" | sed 's/^/- /' || true
    } >> "$OUT"
}

if [ "$DRY_RUN" = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""  # the same self-check on any machine
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # a shared CPU: one thread per process
    echo "== gpu_check --dry-run: the CUDA tests must be collected and skip with their reason"
    timeout --kill-after=10 120 "$PYTHON" -m pytest -q -m cuda tests/gpu -rs -p no:cacheprovider 2>&1 \
        | tee "$TESTS_LOG"
    tests_status=${PIPESTATUS[0]}
    if [ "$tests_status" != 0 ] || ! grep -qE '^[0-9]+ skipped' "$TESTS_LOG" \
        || grep -qE '[0-9]+ (passed|failed|error)' "$TESTS_LOG" || ! grep -q 'no CUDA device' "$TESTS_LOG"; then
        echo "gpu_check --dry-run: expected every CUDA test collected and skipped for want of a CUDA device" \
             "(pytest exit status $tests_status; log: $TESTS_LOG)" >&2
        exit 1
    fi
    echo "== gpu_check --dry-run: benchmarks/gpu_steps.py at the small synthetic shapes on the CPU"
    timeout --kill-after=10 300 "$PYTHON" benchmarks/gpu_steps.py --device cpu --tiny --workers 1 --out "$OUT"
    table_status=$?
    append_tests "$tests_status"
    echo "gpu_check --dry-run: table in $OUT ($((SECONDS - START)) s; table exit status $table_status)"
    exit "$table_status"
fi

if ! "$PYTHON" - <<'PY'
import os
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"gpu_check: no CUDA device is visible to torch {torch.__version__} (built for CUDA {torch.version.cuda}; "
             f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). Run it on a machine with a GPU "
             "after the README's set-up (the torch build for your CUDA first), or pass --dry-run for the CPU "
             "self-check.")
properties = torch.cuda.get_device_properties(0)
print(f"== gpu_check on {torch.cuda.device_count()} CUDA device(s); cuda:0 is {properties.name}, "
      f"{properties.total_memory / 2**30:.1f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
then
    exit 2
fi

echo "== gpu_check: the CUDA tests (limit ${TESTS_LIMIT_S} s)"
timeout --kill-after=10 "$TESTS_LIMIT_S" "$PYTHON" -m pytest -q -m cuda tests/gpu -rs -p no:cacheprovider 2>&1 \
    | tee "$TESTS_LOG"
tests_status=${PIPESTATUS[0]}

echo "== gpu_check: the table at the full shapes (limit ${TABLE_LIMIT_S} s)"
timeout --kill-after=10 "$TABLE_LIMIT_S" "$PYTHON" benchmarks/gpu_steps.py --device cuda \
    --budget-s "$TABLE_ROW_BUDGET_S" --out "$OUT"
table_status=$?
if [ ! -f "$OUT" ]; then
    echo "# gpu_check: the table wrote nothing (exit status $table_status)" > "$OUT"
fi
if [ "$table_status" = 124 ] || [ "$table_status" = 137 ]; then
    printf '\nThe table stopped at its %s s limit: the rows above are the ones it finished.\n' "$TABLE_LIMIT_S" \
        >> "$OUT"
fi
append_tests "$tests_status"

echo "gpu_check: table and tests in $OUT ($((SECONDS - START)) s; tests exit status $tests_status, table $table_status)"
for status in "$tests_status" "$table_status"; do
    if [ "$status" = 124 ] || [ "$status" = 137 ]; then exit 124; fi
done
if [ "$tests_status" != 0 ] || [ "$table_status" != 0 ]; then exit 1; fi
exit 0
