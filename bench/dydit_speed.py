"""DyDiT inference speed against the dense DiT (spec /work/shared/specs/dydit.md, section 6 "GPU benchmark", "Report").

DiT-XL/2 at 256 px with random weights; 50 DDIM steps with classifier-free guidance (cond + uncond in one model
call at batch 2B), bf16, batch B in {1, 8, 32}: the dense DiT, the DyDiT sliced path and the DyDiT masked-only path,
all in one process, timed with CUDA events (warm-up, median of repeats). "sliced-cap" is the sliced path with
`use_token_capacity` (no host sync); "sliced-cap-graphs" and "dense-graphs" replay those model calls from one CUDA
graph per sampling step (dit/step_graphs.py; rows record the recording time and the difference from the eager
outputs), so the host's kernel launches leave the timing. "sliced-compiled-graphs" is sliced-cap-graphs with the
sliced block halves compiled (`DyDiT.compile_sliced`: the elementwise work fused as in the compiled dense model;
its recording time includes the compilation; on CUDA its kept tokens and the attention half's norm go through
dit/kept_tokens.py's kernels; "sliced-compiled-graphs-mlp" uses only the MLP half's kernels and
"sliced-compiled-graphs-plain" none, plain torch ops there instead). "dense-compiled" is the dense model through
`dit.fast.prepare_for_sampling(..., --dense-preset)` (default `cudagraphs`: torch.compile with the whole forward
replayed as a CUDA graph), the strongest dense baseline; it runs eagerly on a CPU. Reports img/s, speed-up vs dense, the
dense/executed FLOPs ratio (MacCounter over the whole sampling loop), speed-up / FLOPs ratio (target >= 0.9) and a
time split from torch.profiler (attention core, MLP, gather/scatter, router/plan, host sync).

    python bench/dydit_speed.py                                  # H100: XL, lambda 0.5 and 0.7, B 1 8 32
    python bench/dydit_speed.py --size tiny --device cpu --steps 3 --batches 1 2   # CPU smoke check

Synthetic routers (random routers stay all-on at the bias init, so masks are built instead). They are real router
weights, evaluated by DyDiT's own code in both paths, with every decision a threshold on one reserved channel, so the
masks are deterministic and identical in the masked and sliced paths:
- Timestep channel: hidden unit 0 of `time_embed.mlp[0]` reads only the lowest-frequency sin feature (sin(t f) with
  t f <= 0.11, monotone in t), and row `d_t` of `time_embed.mlp[2]` reads only that unit, so E_t[d_t] =
  SiLU(a sin(t f)) increases with t.  Head router row j (head j+1) = -s e_{d_t}, bias s v_j: head j+1 is on iff
  E_t[d_t] < v_j, i.e. for t below a threshold (heads are a prefix; less width at high noise). The same for the
  channel (MLP group) router. Thresholds v_j are bf16-exact midpoints between the values at adjacent sampler steps.
- Token channel: residual channel `d_x` is made to carry only the position embedding: the patch conv's output
  `d_x` and row `d_x` of every block's attn.proj / mlp.fc2 (weights and biases) are zero, so x[:, n, d_x] =
  pos_embed[n, d_x] in every block. d_x is the column-half sin channel with the largest frequency that is still
  monotone over the grid, so it orders the grid columns. Token router: hidden unit 0 = ReLU(x[d_x]) (>= 0 already),
  output = A (ReLU - theta_l): token kept iff its column's value > theta_l, i.e. the right-most c_l columns of the
  grid in block l keep their MLP; the others skip it. Keep fraction per block = c_l / grid.
- Plan: per step with noise u = t / T, width fraction a(u) = clip(s (1.25 - 0.5 u), 1/H, 1) of heads and of groups
  (count = round(a H)), token columns clip(round((s + 0.25) grid), 1, grid); s is bisected so the spec's r over the
  sampler grid is closest to lambda, then per-block column counts are nudged greedily. The executed ratio is then
  measured with MacCounter over the real loop and must land within --tol (0.03) of lambda.
These weight edits change the DiT that the dense baseline runs too (same object), which does not change its cost.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import statistics
import sys
import time

from pathlib import Path

# Run as a script, bench/ would come first on sys.path and bench/attention.py would shadow the attention package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

import dit.dit as dit_mod
import dit.dydit as dydit_mod
from dit import kept_tokens
from dit.dit import DiT
from dit.dydit import DyDiT, MacCounter
from dit.fast import prepare_for_sampling, restore_eager
from dit.step_graphs import StepGraphs, dense_step_graphs, dydit_step_graphs
from bench.sample_dit import kernel_split as sample_dit_kernel_split

SIZES = {"XL": "DiT-XL/2", "tiny": "DiT-T/2"}
KEPT_TOKEN_MODE = kept_tokens.MODE
# *-graphs: the same model calls replayed from one CUDA graph per sampling step (dit/step_graphs.py; eager on a CPU)
VARIANTS = ("dense", "dense-graphs", "dense-compiled", "sliced", "sliced-cap", "sliced-cap-graphs",
            "sliced-compiled-graphs", "sliced-compiled-graphs-mlp", "sliced-compiled-graphs-plain", "masked")
COMPILED_VARIANTS = ("sliced-compiled-graphs", "sliced-compiled-graphs-mlp", "sliced-compiled-graphs-plain")
GRAPH_VARIANTS = ("dense-graphs", "sliced-cap-graphs") + COMPILED_VARIANTS
# Variants that run the sliced path with a token capacity (their executed FLOPs are sliced-cap's).
CAPACITY_VARIANTS = ("sliced-cap", "sliced-cap-graphs") + COMPILED_VARIANTS
GUIDANCE = 4.0


# ----------------------------------------------------------------------------------------------- model + masks
def random_dit(name: str, seed: int, device, dtype) -> DiT:
    """DiT with every weight random (std 1/sqrt(fan_in), biases 0.1): no adaLN-Zero identity blocks."""
    torch.manual_seed(seed)
    dit = DiT.from_name(name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in dit.named_parameters():
            std = 0.1 if p.ndim == 1 else p[0].numel() ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return dit.to(device=device, dtype=dtype).eval()


def _bf16_exact_between(lo: float, hi: float, dtype) -> float:
    """A value representable in `dtype`, strictly between lo < hi (the midpoint, rounded)."""
    mid = torch.tensor((lo + hi) / 2, dtype=torch.float32).to(dtype).float().item()
    if not lo < mid < hi:
        raise ValueError(f"no {dtype} value strictly between {lo} and {hi}: sampler steps too close for the synthetic"
                         " timestep channel; use fewer steps or float32")
    return mid


class SyntheticRouters:
    """Installs the reserved-channel routers described in the module docstring."""

    def __init__(self, model: DyDiT, timesteps: list[int], num_train_timesteps: int):
        self.model, self.dit = model, model.dit
        cfg = self.dit.config
        self.D, self.H, self.L = cfg.hidden_size, cfg.num_heads, len(self.dit.blocks)
        self.grid = cfg.sample_size // cfg.patch_size
        self.timesteps, self.T = timesteps, num_train_timesteps
        p = next(self.dit.parameters())
        self.device, self.dtype = p.device, p.dtype
        self._reserve_channels()

    @torch.no_grad()
    def _reserve_channels(self) -> None:
        D, dit = self.D, self.dit
        # token channel: the column-half sin channel with the largest monotone frequency over the grid
        quarter = D // 4
        omega = 1.0 / dit_mod.MAX_PERIOD ** (torch.arange(quarter, dtype=torch.float64) / quarter)
        ok = ((self.grid - 1) * omega <= 0.95 * math.pi / 2).nonzero().flatten()
        self.d_x = int(ok[0])
        self.d_t = D - 1  # timestep channel in E_t (a different index from d_x)
        assert self.d_t != self.d_x
        dit.patch_embed.weight[self.d_x] = 0
        dit.patch_embed.bias[self.d_x] = 0
        for block in dit.blocks:
            for lin in (block.attn.proj, block.mlp.fc2):
                lin.weight[self.d_x] = 0
                lin.bias[self.d_x] = 0
        pos = dit.pos_embed[0, :, self.d_x].to(self.dtype).float()  # (N,) as the residual holds it
        self.col_values = pos[: self.grid]  # row 0: columns 0..grid-1, increasing
        assert bool((self.col_values[1:] > self.col_values[:-1]).all()) and float(self.col_values[0]) >= 0
        # timestep channel: unit 0 of mlp[0] reads the lowest-frequency sin feature; E_t[d_t] = SiLU(unit 0)
        half = dit_mod.TIMESTEP_FREQ_DIM // 2
        te = dit.time_embed.mlp
        f_low = math.exp(-math.log(dit_mod.MAX_PERIOD) * (half - 1) / (half - dit.time_embed.freq_shift))
        te[0].weight[0] = 0
        te[0].weight[0, 2 * half - 1] = 8.0 / math.sin(self.T * f_low)  # pre-activation in [0, 8]
        te[0].bias[0] = 0
        te[2].weight[self.d_t] = 0
        te[2].weight[self.d_t, 0] = 1.0
        te[2].bias[self.d_t] = 0
        t = torch.tensor([float(s) for s in self.timesteps], device=self.device)
        self.t_values = dit.time_embed(t)[:, self.d_t].float().cpu()  # (S,) in the model dtype, increasing in t

    # --- plan: per step (heads, groups) counts and per block token columns
    def plan(self, s: float) -> tuple[list[tuple[int, int]], list[int]]:
        H, widths = self.H, []
        for t in self.timesteps:
            a = min(max(s * (1.25 - 0.5 * t / self.T), 1.0 / H), 1.0)
            n = min(max(round(a * H), 1), H)
            widths.append((n, n))
        cols = min(max(round((s + 0.25) * self.grid), 1), self.grid)
        return widths, [cols] * self.L

    def ratio(self, widths: list[tuple[int, int]], cols: list[int]) -> float:
        """The spec's r over the sampler grid (what MacCounter counts for these deterministic masks)."""
        A, M = self.model.dense_layer_macs()
        H, tot = self.H, 0.0
        for h, g in widths:
            for c in cols:
                tot += A * h / H + M * (g / H) * (c / self.grid)
        return tot / (len(widths) * self.L * (A + M))

    def tune(self, lam: float) -> tuple[list[tuple[int, int]], list[int]]:
        lo, hi = 0.0, 1.5
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.ratio(*self.plan(mid)) < lam else (lo, mid)
        cands = [self.plan(x) for x in (lo, hi)]
        widths, cols = min(cands, key=lambda p: abs(self.ratio(*p) - lam))
        cols = list(cols)
        for _ in range(2 * self.L):  # greedy per-block nudges of the token columns
            best = abs(self.ratio(widths, cols) - lam)
            move = None
            for layer in range(self.L):
                for d in (-1, 1):
                    c = cols[layer] + d
                    if 1 <= c <= self.grid:
                        trial = cols[:layer] + [c] + cols[layer + 1:]
                        err = abs(self.ratio(widths, trial) - lam)
                        if err < best - 1e-12:
                            best, move = err, trial
            if move is None:
                break
            cols = move
        return widths, cols

    @torch.no_grad()
    def install(self, widths: list[tuple[int, int]], cols: list[int]) -> None:
        """Router weights realising the plan; checks the plan DyDiT computes matches."""
        H, BIG, s = self.H, 1.0e4, 4.0
        v = self.t_values.tolist()
        order = sorted(range(len(v)), key=lambda i: v[i])  # steps by increasing t
        for layer, router in enumerate(self.model.routers):
            for lin, which in ((router.head_router, 0), (router.channel_router, 1)):
                lin.weight.zero_()
                for j in range(H - 1):  # router output j gates head / group j + 1
                    on = [widths[i][which] > j + 1 for i in range(len(v))]
                    on_sorted = [on[i] for i in order]  # must be True..True False..False
                    k = sum(on_sorted)
                    if on_sorted != [True] * k + [False] * (len(v) - k):
                        raise ValueError("width plan is not a threshold in t")
                    if k == len(v):
                        lin.bias[j] = BIG
                    elif k == 0:
                        lin.bias[j] = -BIG
                    else:
                        thr = _bf16_exact_between(v[order[k - 1]], v[order[k]], self.dtype)
                        lin.weight[j, self.d_t] = -s
                        lin.bias[j] = s * thr
            tr = router.token_router
            for m in (tr[0], tr[2]):
                m.weight.zero_()
                m.bias.zero_()
            tr[0].weight[0, self.d_x] = 1.0
            c = cols[layer]
            cv = self.col_values.tolist()
            if c == self.grid:
                tr[2].bias[0] = BIG
            else:
                lo_v, hi_v = cv[self.grid - c - 1], cv[self.grid - c]
                thr = _bf16_exact_between(lo_v, hi_v, self.dtype)
                gap = min(thr - lo_v, hi_v - thr)
                amp = 2.0 ** math.ceil(math.log2(8.0 / gap))
                tr[2].weight[0, 0] = amp
                tr[2].bias[0] = -amp * thr
        self.model.clear_cache()
        for i, t in enumerate(self.timesteps):
            got = self.model.width_plan(t)
            h, g = widths[i]
            want = (tuple(range(h)), tuple(range(g)))
            if any(p != want for p in got):
                raise AssertionError(f"step {i} (t={t}): installed routers give {got[0]}, want {want}")


# ----------------------------------------------------------------------------------------------- sampling
def make_scheduler(steps: int, device) -> DDIMScheduler:
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                          clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(steps, device=device)
    return sched


def model_fn(variant: str, dit: DiT, dydit: DyDiT, counter: MacCounter | None = None):
    """The eager model call of a variant (graph variants: `StepGraphs`, built per cell in main)."""
    if variant == "dense":
        return lambda x, t, y: dit(x, t, y)
    mode = "masked" if variant == "masked" else "sliced"  # sliced-cap: sliced with DyDiT.use_token_capacity
    return lambda x, t, y: dydit(x, t, y, mode=mode, counter=counter).sample


@torch.no_grad()
def sample(fn, sched: DDIMScheduler, x0, y_in, channels: int, dydit: DyDiT | None = None):
    """The ClassToImagePipeline loop: batched cond + uncond (2B) model call, guidance, DDIM step. With `dydit` (the
    sliced variant) the run is planned first, as `DyDiTTransformer.attach` does in the pipelines: one router pass
    for every step, prefix weight views, no per-step host sync for the widths. `fn` may be a `StepGraphs` (planned
    when built): step i's model call is then its graph i."""
    if dydit is not None:
        dydit.set_sampling_grid(sched.timesteps)
    latents = x0
    # As dit.pipelines.denoise: the scheduler steps on CPU timesteps (its tables are on the CPU, and a GPU t would
    # make every step wait for the forward), the model takes a slice of one device copy.
    t_model = sched.timesteps.to(x0.device)
    for i, t in enumerate(sched.timesteps.cpu()):
        x_in = sched.scale_model_input(latents, t)
        x_in = torch.cat([x_in, x_in])
        args = (x_in, t_model[i].expand(x_in.shape[0]), y_in)
        out = fn(i, *args) if isinstance(fn, StepGraphs) else fn(*args)
        eps_c, eps_u = out[:, :channels].chunk(2)
        eps = eps_u + GUIDANCE * (eps_c - eps_u)
        latents = sched.step(eps, t, latents).prev_sample
    return latents


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_run(run, device, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        run()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            run()
            e.record()
            torch.cuda.synchronize(device)
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------------------------- time split
SECTIONS = ("attention_core", "mlp", "gather_scatter", "router_plan")
SYNC_OPS = ("aten::nonzero", "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "cudaStreamSynchronize",
            "cudaDeviceSynchronize")


class Instrument:
    """Temporarily wraps the attention call, the MLPs, the token gather/scatter and the routers in
    record_function ranges (for the profiled pass only; timing runs are unwrapped)."""

    def __init__(self, dit: DiT, dydit: DyDiT):
        self.dit, self.dydit, self.undo = dit, dydit, []

    def _patch(self, obj, name, new):
        old = getattr(obj, name)
        setattr(obj, name, new)
        self.undo.append(lambda: setattr(obj, name, old))
        return old

    def _hook_range(self, module, label):
        state = {}

        def pre(_m, _a):
            state["r"] = torch.profiler.record_function(label)
            state["r"].__enter__()

        def post(_m, _a, _o):
            state.pop("r").__exit__(None, None, None)

        h1, h2 = module.register_forward_pre_hook(pre), module.register_forward_hook(post)
        self.undo += [h1.remove, h2.remove]

    def __enter__(self):
        rf = torch.profiler.record_function
        for mod in (dit_mod, dydit_mod):
            att = getattr(mod, "attention")

            def wrapped_att(*a, _att=att, **k):
                with rf("attention_core"):
                    return _att(*a, **k)

            self._patch(mod, "attention", wrapped_att)
        tsm = dydit_mod.token_skip_mlp

        def wrapped_tsm(x, keep, mlp, *rest, **kw):
            def mlp_r(h, seq):
                with rf("mlp"):
                    return mlp(h, seq)
            with rf("gather_scatter"):  # minus the nested mlp range, see split()
                return tsm(x, keep, mlp_r, *rest, **kw)

        self._patch(dydit_mod, "token_skip_mlp", wrapped_tsm)
        cls = type(self.dydit)
        for name in ("set_sampling_grid", "_plan_for"):  # the per-run plan and the per-step lookup
            plan = getattr(cls, name)

            def wrapped_plan(model, *a, _plan=plan, **k):
                with rf("router_plan"):
                    return _plan(model, *a, **k)

            self._patch(cls, name, wrapped_plan)
        for block in self.dit.blocks:
            self._hook_range(block.mlp, "mlp")  # dense DiT: the whole MLP module
            self._hook_range(block.mlp.fc1, "mlp_fc")  # masked path calls fc1 / fc2 directly
            self._hook_range(block.mlp.fc2, "mlp_fc")
        for router in self.dydit.routers:
            for m in (router.token_router, router.head_router, router.channel_router):
                self._hook_range(m, "router_plan")
        return self

    def __exit__(self, *exc):
        for u in reversed(self.undo):
            u()
        self.undo.clear()


def split(run, device, dit, dydit, variant: str) -> dict:
    """ms per sampling run in each section (device time on CUDA, CPU time on CPU) and host sync CPU ms."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with Instrument(dit, dydit):
        run()  # warm the wrapped path
        sync(device)
        with torch.profiler.profile(activities=acts) as prof:
            run()
            sync(device)
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    by_name: dict[str, float] = {}
    sync_us = 0.0
    total_dev = 0.0
    for evt in prof.key_averages():
        by_name[evt.key] = by_name.get(evt.key, 0.0) + getattr(evt, key)
        if evt.key in SYNC_OPS:
            sync_us += evt.self_cpu_time_total
        if device.type == "cuda":
            total_dev += getattr(evt, "self_device_time_total", 0.0)
    if device.type != "cuda":
        total_dev = sum(e.self_cpu_time_total for e in prof.key_averages())
    out = {k: by_name.get(k, 0.0) / 1e3 for k in SECTIONS}
    # nested ranges: the dense MLP module range contains the fc1/fc2 ranges, gather_scatter contains mlp;
    # the masked path runs fc1 / fc2 outside the MLP module (gelu and the masks then count as other)
    if variant == "masked":
        out["mlp"] = by_name.get("mlp_fc", 0.0) / 1e3
    out["gather_scatter"] = max(out["gather_scatter"] - out["mlp"], 0.0) if "gather_scatter" in by_name else 0.0
    out["host_sync_cpu"] = sync_us / 1e3
    out["profiled_total"] = total_dev / 1e3
    out["other"] = max(out["profiled_total"] - sum(out[k] for k in SECTIONS), 0.0)
    return out


# Kernel-name classes for runs without Python ranges (graph replays, compiled graphs), first match wins: the gather /
# scatter of the kept tokens is its own class (fused kernels named after an index_select count there too).
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attention", "attn", "cudnn")),
    ("gemm", ("gemm", "sm90_", "sm100_", "cutlass", "cublas", "matmul", "_mm_", "splitk", "nvjet")),
    ("index_scatter", ("index", "scatter", "nonzero", "gather", "cumsum")),
    ("fused_elementwise", ("triton_",)),
)


def kernel_split(run, device) -> dict:
    """ms per sampling run by kernel kind, kernel count, host gap and the top kernels (bench/sample_dit.py's
    profiler split with DyDiT's kinds): where time goes when there are no Python ranges."""
    return sample_dit_kernel_split(run, device, KERNEL_KINDS, top=20) or {}


# ----------------------------------------------------------------------------------------------- main
def rel_diff(got, ref) -> float:
    """||got - ref|| / ||ref|| over the final latents."""
    return float((got.float() - ref.float()).norm() / ref.float().norm())


def fmt(x, nd=2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="XL", help="XL: DiT-XL/2 256 px; tiny: DiT-T/2 (CPU smoke)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="images per run (model batch 2B)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--lams", type=float, nargs="+", default=[0.5, 0.7], help="target executed-FLOPs ratios")
    p.add_argument("--repeats", type=int, default=5, help="timed sampling runs per cell (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed sampling runs per cell")
    p.add_argument("--tol", type=float, default=0.03, help="allowed |executed ratio - lambda|")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--no-split", action="store_true", help="skip the profiled time split")
    p.add_argument("--kernel-split", action="store_true",
                   help="graph and compiled rows: device time by kernel kind (GEMM, attention, fused elementwise, "
                        "index/scatter, other) from one profiled run")
    p.add_argument("--dense-preset", default="cudagraphs", help="dit.fast preset of the dense-compiled variant")
    p.add_argument("--cap-margin", type=float, default=0.1,
                   help="sliced-cap: capacity = calibrated kept share x (1 + margin), rounded up to 64 rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/dydit_speed.json")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = SIZES[args.size]
    dit = random_dit(name, args.seed, device, dtype)
    dydit = DyDiT.from_dit(dit).to(device=device, dtype=dtype).eval()
    channels, S = dit.config.in_channels, dit.config.sample_size
    sched = make_scheduler(args.steps, device)
    timesteps = [int(t) for t in sched.timesteps.tolist()]
    synth = SyntheticRouters(dydit, timesteps, sched.config.num_train_timesteps)

    rows, plans = [], {}
    # The dense baselines' rows by batch (they do not depend on lambda); every row's speed-ups are against these.
    baselines: dict[str, dict[int, dict]] = {"dense": {}, "dense-graphs": {}, "dense-compiled": {}}
    dense_cache = baselines["dense"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(complete: bool) -> dict:
        """Written after every row, so a run cut off by a time limit keeps what it measured; fills in each row's
        speed-up against the dense row of its batch once that is measured."""
        for row in rows:
            if row["batch"] in dense_cache:
                d = dense_cache[row["batch"]]["median_s"]
                row.update(speedup=d / row["median_s"], flops_speedup=1.0 / row["executed_flops_ratio"],
                           speedup_over_flops=d / row["median_s"] * row["executed_flops_ratio"])
            # graphs against graphs (what DyDiT adds to launch savings), and against the strongest dense baseline
            for name in ("dense-graphs", "dense-compiled"):
                base = baselines[name].get(row["batch"])
                if base is not None:
                    row["speedup_vs_" + name.replace("-", "_")] = base["median_s"] / row["median_s"]
        result = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torch": torch.__version__,
            "command": " ".join(shlex.quote(a) for a in ["python"] + sys.argv) if argv is None
            else " ".join(shlex.quote(a) for a in ["python", "bench/dydit_speed.py", *argv]),
            "config": f"{name} {S * 8} px (latent {S}x{S}), random weights std 1/sqrt(fan_in), {args.steps} DDIM "
                      f"steps, CFG {GUIDANCE} batched (model batch 2B), {str(dtype).replace('torch.', '')}",
            "synthetic_routers": "reserved-channel threshold routers (bench/dydit_speed.py docstring)",
            "complete": complete,
            "plans": plans,
            "rows": rows,
        }
        out.write_text(json.dumps(result, indent=2))
        return result
    for lam in args.lams:
        widths, cols = synth.tune(lam)
        synth.install(widths, cols)
        # executed FLOPs over the real loop (batch 1: per-sample counts do not depend on B, masks are shared)
        g = torch.Generator(device="cpu").manual_seed(args.seed)
        x1 = torch.randn(1, channels, S, S, generator=g).to(device, dtype)
        y1 = torch.tensor([1, dit.null_class_id], device=device)
        ratios = {}
        dydit.exact_token_gather()
        dydit._kept_frac.clear()  # calibrate the token capacities on this lambda's routers (the sliced pass below)
        for variant in ("sliced", "sliced-cap", "masked"):
            c = MacCounter()
            if variant == "sliced-cap":
                dydit.use_token_capacity(margin=args.cap_margin)
            sample(model_fn(variant, dit, dydit, c), make_scheduler(args.steps, device), x1, y1, channels,
                   None if variant == "masked" else dydit)
            dydit.exact_token_gather()
            ratios[variant] = c.ratio
        # the spec's mask-estimated r (masked path: what the masks would save)
        est = synth.ratio(widths, cols)
        if abs(ratios["sliced"] - lam) > args.tol:
            raise AssertionError(f"lambda {lam}: executed ratio {ratios['sliced']:.4f} is off by more than {args.tol}")
        plans[str(lam)] = {"widths_per_step": widths, "token_columns_per_block": cols, "grid": synth.grid,
                           "timesteps": timesteps, "mask_ratio": est, "executed_ratio_sliced": ratios["sliced"]}
        print(f"lambda {lam}: executed ratio (sliced, MacCounter) {ratios['sliced']:.4f}, mask r {est:.4f}; "
              f"heads/groups per step {[w[0] for w in widths]}, token columns per block {cols}/{synth.grid}",
              flush=True)
        for B in args.batches:
            g = torch.Generator(device="cpu").manual_seed(args.seed + B)
            x0 = torch.randn(B, channels, S, S, generator=g).to(device, dtype)
            yc = torch.randint(0, dit.config.num_classes, (B,), generator=g).to(device)
            y_in = torch.cat([yc, torch.full_like(yc, dit.null_class_id)])
            refs = {}  # this cell's eager outputs by variant, for the graph variants' comparisons
            for variant in args.variants:
                # -plain: the kept tokens gathered and scattered by plain torch ops (compiled by inductor) instead of
                # dit/kept_tokens.py's kernels, the path before them, for a ratio in the same run; -mlp: the kernels
                # for the MLP half only (the attention half's LayerNorm + modulation left to inductor)
                kept_tokens.MODE = {"plain": "off", "mlp": "mlp"}.get(variant.rsplit("-", 1)[-1], KEPT_TOKEN_MODE)
                cache = baselines.get(variant)
                if cache is not None and B in cache:  # dense does not depend on lambda
                    rows.append({**cache[B], "lam": lam})
                    continue

                def eager(variant):
                    fn, planned = model_fn(variant, dit, dydit), None if variant in ("dense", "masked") else dydit
                    return lambda: sample(fn, sched, x0, y_in, channels, planned)

                def eager_output(variant):
                    if variant not in refs:
                        refs[variant] = eager(variant)()
                    return refs[variant]

                graphs, extra, warmup = None, {}, args.warmup
                if variant in GRAPH_VARIANTS:
                    if variant == "dense-graphs":
                        ref = eager_output("dense")
                        graphs = dense_step_graphs(dit, args.steps)
                    else:  # sliced-cap-graphs: the sliced-cap variant's calls, one graph per step
                        exact = eager_output("sliced")  # exact gather (run before use_token_capacity)
                        dydit.use_token_capacity(margin=args.cap_margin)
                        ref = eager_output("sliced-cap")
                        if variant in COMPILED_VARIANTS:  # the same, its two block halves compiled
                            # afresh: the kernels' mode is a guard of the compiled halves, and switching it per
                            # variant would spend dynamo's recompile limit (the sixteenth session's first call)
                            torch._dynamo.reset()
                            dydit.compile_sliced()
                        graphs = dydit_step_graphs(dydit, sched.timesteps)
                    run = lambda graphs=graphs: sample(graphs, sched, x0, y_in, channels)  # noqa: E731
                    t0 = time.perf_counter()
                    run()  # records every step's graph (warm-up + capture; eager on a CPU)
                    sync(device)
                    extra = {"record_s": time.perf_counter() - t0, "captured": bool(graphs.capture)}
                    got = run()  # replayed, which also serves as a warm-up run
                    warmup = max(warmup - 1, 0)
                    extra["vs_eager_rel"] = rel_diff(got, ref)
                    if variant != "dense-graphs":
                        extra.update(cap_margin=args.cap_margin, vs_exact_rel=rel_diff(got, exact))
                elif variant == "dense-compiled":
                    ref = eager_output("dense")
                    if device.type == "cuda":  # compiled in place on the shared DiT; DyDiT calls its blocks' parts
                        prepare_for_sampling(dit, args.dense_preset)
                    run = eager("dense")
                    got = run().clone()  # the first call compiles (and warms up); a graph's output is reused
                    extra = {"dense_preset": args.dense_preset if device.type == "cuda" else "eager (CPU)",
                             "vs_eager_rel": rel_diff(got, ref)}
                else:
                    run = eager(variant)
                if variant == "sliced-cap":
                    # Sync-free token gather (capacities from the calibration above): its output against the exact
                    # gather's, and whether any block step overflowed its capacity, recorded beside the time.
                    exact = refs["sliced"] = run()
                    dydit.use_token_capacity(margin=args.cap_margin)
                    got = refs["sliced-cap"] = run()
                    extra = {"cap_margin": args.cap_margin, "vs_exact_rel": rel_diff(got, exact)}
                times = time_run(run, device, args.repeats, warmup)
                if variant in CAPACITY_VARIANTS:
                    extra["overflowed_block_steps"] = dydit.token_overflow()  # the graphs add into the same counter
                med = statistics.median(times)
                dense = variant in ("dense", "dense-graphs", "dense-compiled")
                # replays run the same shapes as the eager calls they recorded
                executed = 1.0 if dense else ratios["sliced-cap" if variant in CAPACITY_VARIANTS else variant]
                row = {"lam": lam, "batch": B, "variant": variant, "steps": args.steps,
                       "median_s": med, "times_s": times, "img_per_s": B / med,
                       "executed_flops_ratio": executed,
                       "mask_flops_ratio": 1.0 if dense else est}
                row.update(extra)
                if variant in COMPILED_VARIANTS and kept_tokens.MODE != "off":
                    row["kept_token_kernels"] = {"tuned": kept_tokens.tuned_configs()}
                if args.kernel_split and (graphs is not None or variant == "dense-compiled"):
                    row["kernel_split_ms"] = kernel_split(run, device)
                if not args.no_split and (graphs is not None or variant == "dense-compiled"):
                    # The split's ranges wrap Python calls (attention, MLP, gather), which a replay does not make.
                    row.update(split_ms=None, split_skipped="graph replays and compiled graphs make no Python calls "
                                                            "for the profiler's ranges to wrap")
                elif not args.no_split:
                    row["split_ms"] = split(run, device, dit, dydit, variant)
                if variant in CAPACITY_VARIANTS:
                    dydit.exact_token_gather()
                if variant in COMPILED_VARIANTS:
                    dydit.eager_sliced()
                if variant == "dense-compiled":
                    restore_eager(dit)
                if cache is not None:
                    cache[B] = row
                del graphs, run  # a graph variant's memory pool goes with its graphs
                rows.append(row)
                save(False)
                print(f"  B={B} {variant}: {med * 1e3:.1f} ms / run, {B / med:.2f} img/s", flush=True)
    result = save(True)
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    lines = [f"{result['device']}, torch {result['torch']}, {result['date']}; {result['config']}", "",
             "| λ | B | variant | img/s | speed-up | vs dense-graphs | vs dense-compiled | dense/exec FLOPs | speed-up ÷ FLOPs |"
             " attn core ms | MLP ms | gather/scatter ms | router/plan ms | host sync ms | other ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        s = r.get("split_ms") or {}  # None: a graph variant, not split
        lines.append("| " + " | ".join([
            f"{r['lam']}", str(r["batch"]), r["variant"], fmt(r["img_per_s"]), fmt(r.get("speedup")),
            fmt(r.get("speedup_vs_dense_graphs")), fmt(r.get("speedup_vs_dense_compiled")), fmt(r.get("flops_speedup")), fmt(r.get("speedup_over_flops")),
            *(fmt(s.get(k), 1) for k in (*SECTIONS, "host_sync_cpu", "other"))]) + " |")
    lines.append("")
    lines.append("Split: profiler device time per sampling run (CPU time on CPU); host sync = CPU ms in "
                 "nonzero/item/synchronize; other = qkv/proj GEMMs, norms, adaLN, scheduler, ...; *-graphs rows: "
                 "one CUDA graph per step (dit/step_graphs.py), no split")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
