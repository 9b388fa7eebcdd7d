#!/usr/bin/env bash
# The GPU machine's side of the GPU check (docs/performance.md):
#
#     OUT=/some/folder bash benchmarks/gpu_check.sh [--cpu-smoke]
#
# Run from anywhere in the working tree as it travels (tracked files plus the folders listed in
# benchmarks/device_carry.txt, which `make gpu-prep` fills), with `python3` on the PATH being the
# machine's Python. It installs the carried wheels (.gpu_wheels) into a temporary folder, puts
# that folder and the repository root on PYTHONPATH (nothing is installed into the machine's
# Python), runs benchmarks/gpu_check.py with every scratch file (images, the rehearsal's run,
# logs) in a temporary folder outside $OUT, and leaves in $OUT only gpu_check.json, gpu_check.md
# and gpu_check_logs.tar.gz (logs, JUnit files, the throughput table, the run's small files).
# Exit status: gpu_check.py's (0 when every section passed); 2 for a usage error.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
if [ -z "${OUT:-}" ]; then
    echo "error: set OUT to the folder whose files come back" >&2
    exit 2
fi
mode=()
case "${1:-}" in
    --cpu-smoke) mode=(--cpu-smoke) ;;
    "") ;;
    *) echo "usage: OUT=folder bash benchmarks/gpu_check.sh [--cpu-smoke]" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
scratch=$(mktemp -d "${TMPDIR:-/tmp}/harma-gpu-check.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
work="$scratch/work"
mkdir -p "$work/logs"

# The packages the machine lacks, as wheels; their installation is the report's "setup" section.
wheels=(.gpu_wheels/*.whl)
if [ -e "${wheels[0]}" ]; then
    python3 -m pip install --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$scratch/site" "${wheels[@]}" >"$work/logs/setup.log" 2>&1
    setup=$?
else
    echo "no wheels in .gpu_wheels: run make gpu-prep here and carry the folders of benchmarks/device_carry.txt" \
        >"$work/logs/setup.log"
    setup=1
fi
export PYTHONPATH="$scratch/site:$PWD"
export PYTHONUNBUFFERED=1

python3 benchmarks/gpu_check.py "${mode[@]}" --data .gpu_data --out "$work" --report-dir "$OUT" \
    --setup-status "$setup" --setup-log "$work/logs/setup.log" 2>&1 | tee "$work/logs/gpu_check.log"
status=${PIPESTATUS[0]}
if [ ! -s "$OUT/gpu_check.json" ]; then  # the check itself failed before its first report
    python3 - "$status" "$work/logs/gpu_check.log" "$OUT/gpu_check.json" <<'PY'
import json, sys
tail = open(sys.argv[2], errors="replace").read().splitlines()[-40:]
json.dump({"ok": False, "error": f"gpu_check.py exited with status {sys.argv[1]} before writing its report",
           "log_tail": tail}, open(sys.argv[3], "w"), indent=2)
PY
fi

# Small files only: no images, no weights, no resume state.
(cd "$work" && find . -type f \( -name '*.log' -o -name '*.xml' -o -name '*.json' -o -name '*.jsonl' \) \
    -not -path './rehearsal_data/*' -size -8M -print0 | tar -czf "$OUT/gpu_check_logs.tar.gz" --null -T -)
exit "$status"
