"""Host (Python + dispatch) time per block step of DyDiT's sliced inference path against the dense DiT.

On the H100 the sliced DyDiT-XL/2 ran at 0.48-0.50x the dense speed at batch 8 (docs/benchmarks.md): each block's
token `nonzero` drains the GPU queue, so the host's time per block step is what the GPU waits for. This measures
that host time where it can be measured without a GPU: a DiT with XL's 28 blocks and 16 heads but tiny tensors
(width 64, 4 tokens), so the wall time of a CPU sampling run is almost all host work. Same synthetic routers and
sampler as bench/dydit_speed.py (lambda 0.5, 50 DDIM steps, CFG batched), the minimum of --repeats runs.

    python bench/dydit_host_overhead.py            # writes bench/results/dydit_host_overhead.json
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])
sys.path.insert(1, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import dydit_speed as D  # noqa: E402
from dit.dit import DiT  # noqa: E402
from dit.dydit import DyDiT  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--lam", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default="bench/results/dydit_host_overhead.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    depth = 28
    dit = DiT(sample_size=4, patch_size=2, in_channels=4, hidden_size=64, depth=depth, num_heads=16,
              num_classes=10).eval()
    dydit = DyDiT.from_dit(dit).eval()
    sched = D.make_scheduler(args.steps, "cpu")
    synth = D.SyntheticRouters(dydit, [int(t) for t in sched.timesteps.tolist()], sched.config.num_train_timesteps)
    synth.install(*synth.tune(args.lam))
    x0, y = torch.randn(1, 4, 4, 4), torch.tensor([1, dit.null_class_id])
    rows = {}
    for variant in ("dense", "sliced", "sliced-cap"):
        fn = D.model_fn(variant, dit, dydit)
        run = lambda: D.sample(fn, sched, x0, y, 4, None if variant == "dense" else dydit)  # noqa: E731
        run()  # (the sliced run also calibrates the capacities sliced-cap uses)
        if variant == "sliced-cap":
            dydit.use_token_capacity(margin=0.1, multiple=1)  # 4 tokens here: no rounding
            run()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        rows[variant] = {"ms_per_block_step": min(times) / (args.steps * depth) * 1e3, "run_s": times}
    rows["sliced_over_dense"] = rows["sliced"]["ms_per_block_step"] / rows["dense"]["ms_per_block_step"]
    rows["sliced_cap_over_dense"] = rows["sliced-cap"]["ms_per_block_step"] / rows["dense"]["ms_per_block_step"]
    rows["sliced_cap_overflowed_block_steps"] = dydit.token_overflow()
    result = {"device": f"CPU ({platform.machine()}, 1 thread)", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "torch": torch.__version__,
              "command": " ".join(shlex.quote(a) for a in ["python", "bench/dydit_host_overhead.py", *(argv or
                                                                                                       sys.argv[1:])]),
              "config": f"DiT with {depth} blocks, 16 heads, width 64, 4 tokens; lambda {args.lam}, {args.steps} "
                        f"DDIM steps, CFG batched (batch 1 -> 2 rows)", **rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "command"}, indent=1)[:800])
    return result


if __name__ == "__main__":
    main()
