# Sourced by every device-call script: $OUT exists, the carried wheels in .whl/ (diffusers, open_clip, ...) are
# installed into /tmp/site when present, and the project runs from PYTHONPATH.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
