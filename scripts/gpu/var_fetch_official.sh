#!/usr/bin/env bash
# Put the official FoundationVision/VAR model code (its `models/` package and the `dist.py` it imports) into
# third_party/VAR/, for bench/var_speed.py's parity and speed comparison. Never committed: the folder gets its own
# `.gitignore` ("*"), so git ignores it without touching the project's .gitignore, and the device tool can carry it
# (carry: ["third_party/VAR"]).
#
#   scripts/gpu/var_fetch_official.sh [MIRROR_GIT_DIR]
#
# MIRROR_GIT_DIR is a bare clone of github.com/FoundationVision/VAR (default: the session's fetched mirror,
# /work/.mirror/FoundationVision+VAR/repo, or a plain `git clone --bare https://github.com/FoundationVision/VAR`).
# The commit is recorded in third_party/VAR/COMMIT; the benchmark writes it into its JSON.
#
# Then, on the GPU machine:
#   python bench/var_speed.py --official third_party/VAR --depths 16 30 --batches 1 16 64
set -euo pipefail
MIRROR="${1:-/work/.mirror/FoundationVision+VAR/repo}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DEST="$ROOT/third_party/VAR"
if ! git --git-dir="$MIRROR" rev-parse --verify HEAD >/dev/null 2>&1; then
  echo "no git repository at $MIRROR (fetch github:FoundationVision/VAR first, or pass a bare clone)" >&2
  exit 2
fi
rm -rf "$DEST"
mkdir -p "$DEST"
git --git-dir="$MIRROR" archive HEAD models dist.py LICENSE | tar -x -C "$DEST"
git --git-dir="$MIRROR" rev-parse HEAD > "$DEST/COMMIT"
printf '*\n' > "$DEST/.gitignore"
echo "official VAR $(cat "$DEST/COMMIT") -> $DEST ($(ls "$DEST/models" | wc -l) files in models/)"
