"""LLaVA-1.5-7B layout speed: our LlavaModel against transformers' LlavaForConditionalGeneration, same config and
the same random weights (bf16), in one process (issue 10, "Speed").

    python bench/llava_speed.py                       # GPU: 7B layout, batch 1 and 8, 576 visual + 64 text, 128 new
    python bench/llava_speed.py --smoke               # CPU: tiny layout, checks the whole path end to end

Measured, per batch size B:
- prefill latency: CLIP ViT-L/14-336 tower + projector + decoder over 576 + 64 tokens, filling the KV cache
  (ours: caching.KVCache sized for the whole generation; transformers: its forward with use_cache=True), and the
  prefill's model FLOP utilisation (decoder matmuls + attention scores, against --peak-tflops);
- decode tokens/s for --new-tokens greedy tokens after that prefill. Ours: the shared cache's buffers in fixed
  shapes (vlm.generate.StaticKV) and one decode step compiled with torch.compile(mode="reduce-overhead") (a CUDA
  graph per step, gpt-fast style). transformers: `generate` with its default dynamic cache. Bandwidth utilisation
  = (decoder weight bytes + live KV bytes read per step) x steps/s / --peak-gbps; at batch 1 the weight read
  bounds decoding (13.5 GB per token at ~3.35 TB/s: at most ~250 tokens/s).
Both models share the weights (ours is loaded from the transformers model's state dict by vlm.llava_loaders), so
the first greedy tokens can be compared; `tokens_agree` is the share of equal tokens (bf16 kernels differ, so a
late divergence is possible; the float32 parity is tests/test_llava_loaders.py).

Burn-in (compilation and warm-up) first, then the median of --repeats timed runs with CUDA synchronisation.
Writes JSON to --out (default bench/results/llava_speed.json) with device, date, torch and the command.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

# Run as a script, bench/ would come first on sys.path and bench/attention.py would shadow the attention package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
import torch._inductor.config as inductor_config

from vlm.generate import StaticKV, decode_step_static, generate_static, prefill, prefill_core, last_real_index
from vlm.llava import CLIP_VIT_L_336, LlavaVLM, CLIPTower, LlavaModel, fuse_projections, unfuse_projections
from vlm.llava_loaders import convert_state_dict, model_config
from caching import KVCache
from bench.profiling import profile_top

# LLaVA-1.5-7B in the llava-hf layout (vocab padded to 32064, <image> = 32000).
TEXT_7B = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0,
               max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
TEXT_SMOKE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
VISION_SMOKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=56,
                    patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=16)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny layout on the CPU, float32, no compilation")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="our decode step eager (no torch.compile)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    p.add_argument("--peak-gbps", type=float, default=3350.0, help="memory bandwidth peak (H100 SXM: 3350 GB/s)")
    p.add_argument("--skip-hf", action="store_true", help="only our model")
    p.add_argument("--fuse-projections", action="store_true",
                   help="also time ours with q/k/v and gate/up stacked into one matrix product each "
                        "(vlm.llava.fuse_projections), in the same run")
    p.add_argument("--compile-prefill", action="store_true",
                   help="also time our prefill's decoder pass compiled whole (vlm.generate.prefill_core, fullgraph)")
    p.add_argument("--profile-prefill", action="store_true",
                   help="print the top device-time ops of one prefill (ours and transformers') at every batch")
    p.add_argument("--prefill-only", action="store_true", help="time the prefills only (no decoding)")
    p.add_argument("--profile-decode", action="store_true",
                   help="print the top device-time ops of our compiled decode (16 steps, after the timed runs)")
    p.add_argument("--cd-tuning", action="store_true",
                   help="inductor's coordinate-descent tuning of its generated kernels (gpt-fast turns it on for "
                        "decoding: the matrix-vector products' block sizes are tuned per shape); slower compile")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.batches, args.text_tokens, args.new_tokens, args.repeats = [1, 2], 8, 8, 2
        args.no_compile = True
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> tuple[float, object]:
    """Median seconds of `repeats` calls after one burn-in call; returns (seconds, last result)."""
    out = fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def build_models(args, device, dtype):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = TEXT_SMOKE if args.smoke else TEXT_7B
    vision = VISION_SMOKE if args.smoke else CLIP_VIT_L_336
    n_img = (vision["image_size"] // vision["patch_size"]) ** 2
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
                      image_token_index=text["vocab_size"] - 64 if not args.smoke else 100,
                      projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
                      image_seq_length=n_img)
    torch.manual_seed(0)
    with torch.device(device):
        hf = LlavaForConditionalGeneration._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    hf.eval()
    layout, lm_state, tower_state = convert_state_dict(hf.state_dict())
    kwargs, vision_cfg, layer = model_config(cfg.to_dict(), layout)
    with torch.device("meta"):
        ours = LlavaModel(**kwargs)
        tower = CLIPTower(vision_cfg, layer)
    ours.load_state_dict({k: v.clone() for k, v in lm_state.items()}, strict=True, assign=True)
    own = tower.model.state_dict()
    prefix = "vision_model." if next(iter(own)).startswith("vision_model.") else ""
    tower.model.load_state_dict({prefix + k: v.clone() for k, v in tower_state.items()}, strict=False, assign=True)
    for name, buf in list(tower.model.named_buffers()):  # position_ids buffers are not in the state dict
        if buf.is_meta:
            mod = tower.model.get_submodule(name.rsplit(".", 1)[0])
            mod.register_buffer(name.rsplit(".", 1)[1], torch.arange(buf.shape[-1], device=device).expand(buf.shape),
                                persistent=False)
    vlm = LlavaVLM(ours.eval(), tower.eval())
    if args.skip_hf:
        del hf
        hf = None
    return vlm, hf, cfg, n_img


def weight_bytes(model: LlavaModel) -> int:
    """Bytes a decode step reads: every decoder and lm_head matrix, one embedding row per token (ignored)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if not n.startswith(("embed_tokens", "mm_projector")))


def prefill_flops(model: LlavaModel, tokens: int, batch: int) -> float:
    c = model.config
    d, f = c.hidden_size, c.intermediate_size
    kv = model.num_kv_heads * model.head_dim
    per_token = 2 * c.num_hidden_layers * (2 * d * d + 2 * d * kv + 3 * d * f)
    attn = 2 * 2 * c.num_hidden_layers * d * tokens * tokens / 2  # QK^T and PV, causal half
    return batch * (per_token * tokens + attn)


@torch.no_grad()
def run(args) -> dict:
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if not args.smoke and device.type != "cuda":
        raise SystemExit("the 7B benchmark needs a GPU; use --smoke on a CPU")
    vlm, hf, cfg, n_img = build_models(args, device, dtype)
    model = vlm.model
    step_fn = decode_step_static
    if not args.no_compile:
        # One graph for the whole step (fullgraph: a graph break raises and says where, instead of silently
        # compiling frames per layer); if that fails, the same without fullgraph, and the reason is recorded.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        if args.cd_tuning:
            inductor_config.coordinate_descent_tuning = True
        step_fn = torch.compile(decode_step_static, mode="reduce-overhead", dynamic=False, fullgraph=True)
    compile_note = "fullgraph" if not args.no_compile else "eager"
    img_id = cfg.image_token_index
    rows = []

    def result(rows: list, complete: bool) -> dict:
        return {
            "bench": "llava_speed", "smoke": args.smoke, "complete": complete,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
            "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "command": " ".join(shlex.quote(a) for a in ["python"] + sys.argv),
            "dtype": str(dtype).replace("torch.", ""), "compiled_decode": not args.no_compile,
            "coordinate_descent_tuning": args.cd_tuning,
            "visual_tokens": n_img, "text_tokens": args.text_tokens, "new_tokens": args.new_tokens,
            "batch1_decode_bound_tokens_per_s": args.peak_gbps * 1e9 / weight_bytes(model),
            "targets": {"decode_batch1": ">= 0.75 x bound", "prefill_speedup": ">= 1.2"},
            "rows": rows,
        }
    for B in args.batches:
        g = torch.Generator().manual_seed(B)
        size = cfg.vision_config.image_size
        pixels = torch.randn(B, 3, size, size, generator=g).to(device, dtype)
        text = torch.randint(3, img_id, (B, args.text_tokens), generator=g)
        ids_ours = torch.cat([torch.ones(B, 1, dtype=torch.long), torch.full((B, 1), img_id), text[:, 1:]], 1).to(device)
        ids_hf = torch.cat([torch.ones(B, 1, dtype=torch.long), torch.full((B, n_img), img_id), text[:, 1:]], 1).to(device)
        L = ids_hf.shape[1]

        def ours_prefill(core=None):
            """Tower, projector, merge, decoder into a fresh cache; `core`: a compiled prefill_core (the prompt has no
            padding, so prefill's mask decision leaves the graph mask-free)."""
            x = model.build_inputs(ids_ours, vlm.vision_tower(pixels))
            cache = KVCache(len(model.layers), B, model.num_kv_heads, model.head_dim, L + args.new_tokens,
                            dtype=dtype, device=device)
            return prefill(model, x.embeds, x.position_ids, x.attention_mask, cache, last_real_index(x.attention_mask),
                           core=core)

        def hf_prefill():
            return hf(input_ids=ids_hf, pixel_values=pixels, use_cache=True, logits_to_keep=1).logits

        t_pre, _ = timed(ours_prefill, device, args.repeats)
        row = {"batch": B, "tokens": L, "ours_prefill_ms": 1e3 * t_pre,
               "ours_prefill_mfu": prefill_flops(model, L, B) / t_pre / (args.peak_tflops * 1e12)}
        if hf is not None:
            h_pre, _ = timed(hf_prefill, device, args.repeats)
            row.update(hf_prefill_ms=1e3 * h_pre, prefill_speedup=h_pre / t_pre)
        if args.compile_prefill:
            # The same prefill with the decoder pass compiled whole.
            core = torch.compile(prefill_core, fullgraph=True, dynamic=False)
            ref, got = ours_prefill(), ours_prefill(core)
            t_pre_compiled, got = timed(lambda: ours_prefill(core), device, args.repeats)
            row.update(ours_prefill_compiled_ms=1e3 * t_pre_compiled,
                       prefill_compiled_vs_eager_rel=((got.float() - ref.float()).norm() / ref.float().norm()).item(),
                       ours_prefill_compiled_mfu=prefill_flops(model, L, B) / t_pre_compiled
                       / (args.peak_tflops * 1e12))
            if hf is not None:
                row["prefill_compiled_speedup"] = h_pre / t_pre_compiled
        if args.profile_prefill:
            profile_top(f"ours prefill batch {B}", ours_prefill, device)
            if args.compile_prefill:
                profile_top(f"ours compiled prefill batch {B}", lambda: ours_prefill(core), device)
            if hf is not None:
                profile_top(f"transformers prefill batch {B}", hf_prefill, device)

        def emit(row):
            rows.append(row)
            write(result(rows, complete=False), args)  # after every row: a run cut off by a time limit keeps it
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

        if args.prefill_only:
            emit(row)
            continue
        x = model.build_inputs(ids_ours, vlm.vision_tower(pixels))
        # One cache per batch size, reused (reset) by every call: the compiled step keeps one CUDA graph.
        static = StaticKV(KVCache(len(model.layers), B, model.num_kv_heads, model.head_dim, L + args.new_tokens,
                                  dtype=dtype, device=device))
        try:
            generate_static(model, x, args.new_tokens, step_fn, static=static)
        except Exception as e:  # noqa: BLE001 - a graph break under fullgraph: record it, compile without
            if args.no_compile or compile_note != "fullgraph":
                raise
            compile_note = f"fullgraph failed ({type(e).__name__}: {str(e).splitlines()[0][:300]}); compiled with breaks"
            print(compile_note, flush=True)
            torch._dynamo.reset()
            step_fn = torch.compile(decode_step_static, mode="reduce-overhead", dynamic=False)
        t_total, (tokens, cache) = timed(lambda: generate_static(model, x, args.new_tokens, step_fn, static=static),
                                         device, args.repeats)
        t_dec = max(t_total - t_pre, 1e-9)
        steps = args.new_tokens - 1
        kv_read = cache.nbytes() / 2  # average live KV over the steps, roughly half-way from L to L + new
        wbytes = weight_bytes(model)
        row.update(ours_decode_tokens_per_s=steps / t_dec, ours_decode_tokens_per_s_total=B * steps / t_dec,
                   ours_bandwidth_util=(wbytes + kv_read) * steps / t_dec / (args.peak_gbps * 1e9),
                   weight_bytes=wbytes, kv_bytes_final=cache.nbytes())
        if hf is not None:
            h_total, h_out = timed(lambda: hf.generate(input_ids=ids_hf, pixel_values=pixels, do_sample=False,
                                                       max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                                       pad_token_id=0), device, args.repeats)
            h_dec = max(h_total - h_pre, 1e-9)
            h_tokens = h_out[:, L:]
            row.update(hf_decode_tokens_per_s=steps / h_dec,
                       hf_bandwidth_util=(wbytes + kv_read) * steps / h_dec / (args.peak_gbps * 1e9),
                       decode_speedup=h_dec / t_dec,
                       tokens_agree=(h_tokens.cpu() == tokens.cpu()).float().mean().item())
        row["decode_compile"] = compile_note
        if args.profile_decode and not args.fuse_projections:
            profile_top(f"ours decode batch {B} ({args.new_tokens} tokens)",
                        lambda: generate_static(model, x, args.new_tokens, step_fn, static=static), device, rows=20)
        if args.fuse_projections:
            fuse_projections(model)
            f_pre, _ = timed(ours_prefill, device, args.repeats)
            f_total, (f_tokens, _) = timed(
                lambda: generate_static(model, x, args.new_tokens, step_fn, static=static), device, args.repeats)
            f_dec = max(f_total - f_pre, 1e-9)
            if args.profile_decode:
                profile_top(f"ours fused decode batch {B} ({args.new_tokens} tokens)",
                            lambda: generate_static(model, x, args.new_tokens, step_fn, static=static), device, rows=20)
            row.update(ours_fused_prefill_ms=1e3 * f_pre, ours_fused_decode_tokens_per_s=steps / f_dec,
                       ours_fused_bandwidth_util=(wbytes + kv_read) * steps / f_dec / (args.peak_gbps * 1e9),
                       fused_tokens_agree=(f_tokens.cpu() == tokens.cpu()).float().mean().item())
            unfuse_projections(model)
        emit(row)
    return result(rows, complete=True)

def write(result: dict, args) -> Path:
    default = "bench/results/llava_speed_smoke.json" if args.smoke else "bench/results/llava_speed.json"
    out = Path(args.out or default)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return out


def main(argv=None):
    args = parse_args(argv)
    result = run(args)
    print(f"wrote {write(result, args)}")
    return result


if __name__ == "__main__":
    main()
