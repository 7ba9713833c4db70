#!/usr/bin/env bash
# The GPU check on a fresh GPU machine, in under 8 minutes: README's two install lines, then bench_gpu.py with what
# is left of the 8 minutes (BUDGET_S, seconds). Prints one markdown table; with $OUT set (the device tool's folder
# that comes back), its runs' outputs, the whole log and the table are written there too.
#   bash bench_gpu.sh                      # or: BUDGET_S=900 bash bench_gpu.sh --shakespeare_iters=1000
set -uo pipefail
cd "$(dirname "$0")"
budget=${BUDGET_S:-470}
[ -n "${OUT:-}" ] && exec > >(tee "$OUT/bench_gpu.log") 2>&1
echo "$(date -u '+%Y-%m-%d %H:%M UTC'): $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | head -1)"
python3 -m pip install -q --retries 2 torch==2.13.0 && python3 -m pip install -q --retries 2 -r requirements.txt ||
  echo "pip install failed: going on with the torch that is installed, if any"
echo "install: ${SECONDS} s"
eager=''  # triton, under torch.compile, builds its launchers with a C compiler against Python's headers
if ! command -v cc > /dev/null && ! command -v gcc > /dev/null; then
  echo "no C compiler here (triton needs one for torch.compile): the runs go eager"; eager=--compile=False
elif ! python3 -c "import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_paths()['include'] + '/Python.h'))"; then
  echo "no Python.h here (triton needs Python's headers for torch.compile): the runs go eager"; eager=--compile=False
fi
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
python3 bench_gpu.py --budget_s=$((budget - SECONDS)) ${OUT:+--log_dir="$OUT/runs" --table="$OUT/table.md"} $eager "$@"
