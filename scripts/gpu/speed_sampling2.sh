#!/usr/bin/env bash
# Second sampling-speed call (issue 6): what the first (speed_sampling.sh) could not fit in its 10 minutes.
#   1. DiT-XL/2 256 px, 32 images, ours under the `fused` preset (max-autotune with prologue / epilogue fusion; its
#      compile alone took > 150 s there), with its kernel split and top kernels;
#   2. PixArt-α 512 px, 8 images, ours compiled (default), kernel split. Diffusers is not re-timed here (no time).
STEP_ARGS="--diffusers-presets none --split-preset default,fused"
source scripts/gpu/sample_steps.sh
step ${S1:-320} --workloads dit256 --presets fused --batches 32
step ${S2:-160} --workloads pixart512 --presets default --batches 8
