#!/usr/bin/env bash
# One device call for the attention layer: doctor (xformers carried as a wheel, to show its probe), the
# attention tests on the GPU, and bench/attention.py. Results land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -m app.cli doctor > "$OUT/doctor.txt" 2>&1; echo "doctor exit $?"
grep -A9 "Attention backends" "$OUT/doctor.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py > "$OUT/tests.log" 2>&1; echo "tests exit $?"
tail -3 "$OUT/tests.log"
timeout 330 python3 bench/attention.py --out "$OUT/attention.json" > "$OUT/bench.log" 2>&1; echo "bench exit $?"
cat "$OUT/attention.md" 2>/dev/null | head -40
