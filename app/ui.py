"""The web UI (Gradio Blocks): one tab per task that has a pipeline, and a Benchmark tab.

The UI holds no model logic: every Generate button calls the functions `ditstudio generate` calls
(`app.generate.generate_class_images` / `generate_text_images` / `generate_videos`, and `generate_var_images` for a
VAR (next-scale) model, listed in the class → image / text → image tab of its task), every result is saved under the
outputs folder the way the CLI saves it (PNG / GIF with the settings embedded) and shown from there, so a download
carries its settings and nothing is lost when the page closes. What is UI-specific lives here:

- progress and a live preview: the pipelines' per-step `callback` reports the step and, every `PREVIEW_EVERY`
  steps, the VAE's decode of the current latents (a VAR model: per scale, the tokenizer's decode of the current
  f̂); the sampling runs in a worker thread and the event handler (a generator) yields the preview as it comes;
- top-k / top-p controls, shown while a VAR model is picked (steps, sampler and negative prompt are hidden then);
  non-zero values for a diffusion model are refused, as the CLI refuses them;
- cancel: the Cancel button cancels the event; the handler's `finally` sets a flag the next step's callback turns
  into an exception, so the worker stops sampling instead of running to the end;
- a per-session gallery (`gr.State`), a seed box with a dice button, the seed actually used shown with the result;
- dropping a PNG / GIF written by DiT Studio onto "Restore settings" fills in the controls from its metadata;
- bad input (out-of-range numbers, empty prompt, unknown model, a corrupt upload, GPU out-of-memory) becomes a
  `gr.Error` message in the page; the server and the next request are unaffected;
- a bounded queue: `QUEUE_SIZE` waiting requests at most (a full queue answers "busy"), one generation at a time
  on a CPU (two on a GPU; the pipelines also serialise on a lock).
"""
from __future__ import annotations

import queue
import random
import threading
import time
from pathlib import Path

import gradio as gr
import torch

from app import generate as gen
from app.catalog import list_models, models_dir
from dit.pipelines import SAMPLERS

PREVIEW_EVERY = 5  # steps between live previews
QUEUE_SIZE = 16
MAX_SEED = 2**31 - 1
MAX_BATCH = 8
MAX_STEPS = 200
DEFAULTS = dict(steps=25, cfg=4.0, sampler="dpm++", seed=0, num=1, top_k=0, top_p=0.0)
KIND_TITLES = {gen.TEXT: "Text → image", gen.CLASS: "Class → image", gen.VIDEO: "Text → video"}
DEFAULT_MODELS = {gen.TEXT: "shapes-t2i", gen.CLASS: "shapes-c2i", gen.VIDEO: "shapes-t2v"}


class Cancelled(Exception):
    """Raised inside the sampling loop (from the step callback) when the user cancelled the request."""


# ----------------------------------------------------------------------------------------------- models
def models_by_kind(directory: Path | None = None) -> dict[str, dict[str, str]]:
    """kind -> {model name: folder} for every servable folder under `directory` (default: the shipped models).
    Folders that are not pipelines (the shared VAE, CLIP) or cannot be read are left out."""
    out: dict[str, dict[str, str]] = {gen.CLASS: {}, gen.TEXT: {}, gen.VIDEO: {}}
    for entry in list_models(directory):
        try:
            kind = gen.model_kind(str(entry.path))
        except (ValueError, OSError, KeyError):
            continue
        out[kind][entry.name] = str(entry.path)
    return out


def _is_var(model) -> bool:
    try:
        return bool(model) and gen.is_var(model)
    except (ValueError, OSError, KeyError):
        return False


def _model_choice(kind: str, models: dict[str, str]) -> str | None:
    default = DEFAULT_MODELS[kind]
    return default if default in models else next(iter(models), None)


def class_names(folder: str) -> list[str]:
    """The class names a class model's id2label gives (ids as text if it has none)."""
    names = gen.label_ids(gen.pipeline_folder(folder))
    if names:
        return list(names)
    pipe = gen.load_pipeline(gen.pipeline_folder(folder), gen.check_device(None), "float32")
    return [str(i) for i in range(pipe.transformer.config.num_classes)]


# ----------------------------------------------------------------------------------------------- checks
def _number(value, name: str, kind=float, lo=None, hi=None):
    """A UI value as int/float within [lo, hi], or a ValueError naming the field (gr.Number can send None/NaN)."""
    try:
        x = kind(value)
        if kind is int and float(value) != x:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be {'a whole number' if kind is int else 'a number'}; got {value!r}") from None
    if x != x or (lo is not None and x < lo) or (hi is not None and x > hi):
        raise ValueError(f"{name} must be " + (f"between {lo} and {hi}" if hi is not None else f">= {lo}")
                         + f"; got {value!r}")
    return x


def _seed(seed, randomize: bool) -> int:
    return random.randint(0, MAX_SEED) if randomize else _number(seed, "seed", int, 0, MAX_SEED)


# ----------------------------------------------------------------------------------------------- running
def _preview(folder: str, latents: torch.Tensor):
    """The first sample's current latents through the VAE, as a PIL image (video: its first frame)."""
    pipe = gen.load_pipeline(gen.pipeline_folder(folder), str(latents.device), "float32")
    from dit.pipelines import decode_latents

    z = latents[:1]
    if z.ndim == 5:  # (B, C, F, h, w): the first frame
        z = z[:, :, 0]
    with torch.no_grad():
        image = decode_latents(pipe.vae, z.float())
    return pipe.image_processor.postprocess(image, "pil")[0]


def _var_preview(folder: str, f_hat: torch.Tensor):
    """A VAR model's first sample after the current scale: its f̂ through the tokenizer's decoder."""
    return gen.load_pipeline(gen.pipeline_folder(folder), str(f_hat.device), "float32").preview(f_hat[:1])[0]


def _run_with_progress(call, folder: str, steps: int, progress: gr.Progress, var: bool = False):
    """Run `call(callback)` in a worker thread; yield (step, preview or None) as sampling goes, then return its
    result (StopIteration value). Cancelling (closing this generator) stops the sampling at its next step.
    `var`: the callback is VAR's per-scale `(k, K, tokens, f_hat)` (steps = K), previewed at every scale."""
    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    box: dict = {}
    unit = "scale" if var else "step"

    def callback(step, *state):
        if stop.is_set():
            raise Cancelled()
        if var:
            preview = _var_preview(folder, state[-1])
        else:
            last = (step + 1) % PREVIEW_EVERY == 0 or step + 1 == steps
            preview = _preview(folder, state[-1]) if last else None
        events.put((step + 1, preview))

    def work():
        try:
            box["result"] = call(callback)
        except BaseException as exc:  # handed to the event handler, which turns it into a message
            box["error"] = exc
        finally:
            events.put(None)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        progress(0, desc="sampling", total=steps)
        while True:
            item = events.get()
            if item is None:
                break
            step, preview = item
            progress(step / steps, desc=f"{unit} {step}/{steps}")
            if preview is not None:
                yield step, preview
    finally:
        stop.set()  # a cancelled request: the worker stops at its next step
    worker.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def _friendly(exc: BaseException) -> gr.Error:
    """The message a user sees; the server keeps running whatever happened."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
        return gr.Error("the GPU ran out of memory: lower the batch size or the number of steps, then try again")
    if isinstance(exc, (ValueError, FileNotFoundError, KeyError)):
        return gr.Error(str(exc))
    return gr.Error(f"generation failed: {type(exc).__name__}: {exc}")


def _outputs(outputs_dir: Path) -> Path:
    folder = outputs_dir / time.strftime("%Y-%m-%d")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def make_generate(kind: str, outputs_dir: Path, device: str | None, models: dict[str, str] | None = None):
    """The Generate handler of one tab: (model, what, negative, sampler, steps, cfg, seed, randomize, num,
    gallery, top_k, top_p) -> yields (preview, gallery, status, gallery state). `models` (name -> folder, the tab's
    list) resolves the names of models from `--models-dir`; other values are shipped names or paths. A VAR model
    ignores steps and sampler (one step per scale); a diffusion model refuses non-zero top-k / top-p."""
    models = models or {}

    def handler(model, what, negative, sampler, steps, cfg, seed, randomize, num, gallery,
                top_k=DEFAULTS["top_k"], top_p=DEFAULTS["top_p"], progress=gr.Progress()):
        try:
            if not model:
                raise ValueError("no model selected")
            folder = str(gen.pipeline_folder(models.get(model, model)))
            var = gen.is_var(folder)
            cfg = _number(cfg, "guidance", float, 0, 30)
            num = _number(num, "batch size", int, 1, MAX_BATCH)
            top_k, top_p = _number(top_k, "top-k", int, 0), _number(top_p, "top-p", float, 0, 1)
            if not var and (top_k or top_p):
                raise ValueError(f"top-k / top-p only apply to VAR (next-scale) models; {model} is a diffusion "
                                 "model: set them to 0")
            steps = gen.var_scales(folder) if var else _number(steps, "steps", int, 1, MAX_STEPS)
            seed = _seed(seed, randomize)
            if var:  # (a diffusion model's kind is checked by its generate function)
                gen.check_kind(folder, kind)
            if kind == gen.CLASS:
                if what in (None, ""):
                    raise ValueError("pick a class")
            else:
                if not isinstance(what, str) or not what.strip():
                    raise ValueError("the prompt is empty")
                what = what.strip()
            if var:
                if kind != gen.CLASS and negative and negative.strip():
                    raise ValueError("VAR models take no negative prompt: clear it")
                call = lambda cb: gen.generate_var_images(folder, [what], cfg, seed, num, top_k, top_p,  # noqa: E731
                                                          device, callback=cb)
            elif kind == gen.CLASS:
                call = lambda cb: gen.generate_class_images(folder, [what], steps, cfg, sampler, seed, num,  # noqa: E731
                                                            device, callback=cb)
            else:
                fn = gen.generate_text_images if kind == gen.TEXT else gen.generate_videos
                call = lambda cb: fn(folder, [what], steps, cfg, seed, num, sampler, negative or "",  # noqa: E731
                                     device, callback=cb)
            runner = _run_with_progress(call, folder, steps, progress, var=var)
            while True:
                try:
                    step, preview = next(runner)
                except StopIteration as done:
                    results = done.value
                    break
                yield preview, gallery, f"{'scale' if var else 'step'} {step}/{steps} · seed {seed}", gallery
            out = _outputs(outputs_dir)
            date = time.strftime("%Y%m%d-%H%M%S")
            paths = []
            for item, settings in results:
                if kind == gen.VIDEO:
                    path, _ = gen.save_gif(item, settings, out, date)
                else:
                    path = gen.save_png(item, settings, out, date)
                paths.append(str(path))
            gallery = list(gallery or []) + paths
            seconds = results[0][1]["seconds"]
            status = f"seed {seed} · {len(paths)} in {seconds:.2f} s · saved to {out}"
            if "flops_executed" in results[0][1]:  # a DyDiT model: what its routers let run
                first = results[0][1]
                status += (f" · executed {first['flops_executed']:.0%} of the dense FLOPs "
                           f"({first['gflops_executed']:.2f} of {first['gflops_dense']:.2f} GFLOPs)")
            yield paths[0], gallery, status, gallery
        except Cancelled:
            return
        except Exception as exc:  # noqa: BLE001 -- every failure becomes a message; the server lives on
            raise _friendly(exc) from exc

    return handler


def restore_settings(file, kind: str):
    """A dropped PNG / GIF -> updates for (model, what, negative, sampler, steps, cfg, seed, randomize, num, top_k,
    top_p); a VAR image leaves sampler and steps as they are (it has none)."""
    try:
        if file is None:
            raise ValueError("no file")
        settings = gen.read_settings(file if isinstance(file, str) else file.name)
        if not isinstance(settings, dict):
            raise ValueError("its metadata is not a settings record")
    except Exception as exc:  # noqa: BLE001 -- corrupt or foreign files
        raise gr.Error(f"this file carries no DiT Studio settings ({type(exc).__name__}: {exc})") from exc
    task = settings.get("task")
    if task != gen.TASKS[kind]:
        raise gr.Error(f"these settings are for {task}, not {gen.TASKS[kind]}")
    what = settings.get("label") if kind == gen.CLASS else settings.get("prompt")
    if kind == gen.CLASS and what is not None:
        try:
            names = class_names(settings["model"])
            what = names[int(what)] if str(what).isdigit() and int(what) < len(names) else what
        except (ValueError, KeyError, IndexError):
            pass
    var = settings.get("family") == "var"
    return (settings.get("model"), what, settings.get("negative_prompt", ""),
            gr.update() if var else settings.get("sampler"), gr.update() if var else settings.get("steps"),
            settings.get("cfg"), settings.get("seed"), False, 1, settings.get("top_k", DEFAULTS["top_k"]),
            settings.get("top_p", DEFAULTS["top_p"]))


# ----------------------------------------------------------------------------------------------- layout
def _task_tab(kind: str, models: dict[str, str], outputs_dir: Path, device: str | None, send_to_chat: bool = False):
    """One generation tab; returns (result image, "Send to Chat" button or None) for the caller's wiring."""
    choice = _model_choice(kind, models)
    var = _is_var(models.get(choice))
    with gr.Row():
        with gr.Column(scale=2):
            model = gr.Dropdown(list(models), value=choice, label="model", allow_custom_value=True)
            if kind == gen.CLASS:
                names = class_names(models[choice]) if choice else []
                what = gr.Dropdown(names, value=names[0] if names else None, label="class", allow_custom_value=True)
                negative = gr.Textbox(visible=False)
                def pick_model(m):
                    choices = class_names(models.get(m, m))
                    return gr.update(choices=choices, value=choices[0])

                model.change(pick_model, model, what, api_name=False)
            else:
                what = gr.Textbox(label="prompt", lines=2, placeholder="a big red star in the top left")
                negative = gr.Textbox(label="negative prompt", value="", visible=not var)
            with gr.Row():
                sampler = gr.Dropdown(list(SAMPLERS), value=DEFAULTS["sampler"], label="sampler", visible=not var)
                steps = gr.Slider(1, MAX_STEPS, value=DEFAULTS["steps"], step=1, label="steps", visible=not var)
                cfg = gr.Slider(0, 15, value=DEFAULTS["cfg"], step=0.5, label="guidance")
            with gr.Row():  # VAR (next-scale) models only
                top_k = gr.Number(value=DEFAULTS["top_k"], precision=0, minimum=0, label="top-k (VAR; 0 = off)",
                                  visible=var)
                top_p = gr.Slider(0, 1, value=DEFAULTS["top_p"], step=0.01, label="top-p (VAR; 0 = off)",
                                  visible=var)
            with gr.Row():
                seed = gr.Number(value=DEFAULTS["seed"], precision=0, label="seed", minimum=0, maximum=MAX_SEED)
                dice = gr.Button("new seed", scale=0, min_width=90)
                randomize = gr.Checkbox(value=False, label="random seed")
                num = gr.Slider(1, MAX_BATCH, value=1, step=1, label="batch size")
            gr.Dropdown(["64"], value="64", label="resolution (px)", interactive=False,
                        info="the shipped models generate at their training resolution")
            with gr.Row():
                run = gr.Button("Generate", variant="primary")
                cancel = gr.Button("Cancel")
            restore = gr.File(label="Restore settings (drop a PNG / GIF made here)", file_types=[".png", ".gif"])
        with gr.Column(scale=3):
            preview = gr.Image(label="result", type="filepath", format="png", height=320,
                               buttons=["download", "fullscreen"])
            status = gr.Markdown()
            gallery = gr.Gallery(label="this session", columns=6, height=260, type="filepath",
                                 buttons=["download", "fullscreen"])
            # images only: the chat model reads a still picture (a video tab's result is a GIF)
            send = gr.Button("Send to Chat", size="sm") if send_to_chat and kind != gen.VIDEO else None

    def pick_family(m):
        """VAR: show top-k / top-p, hide steps, sampler and negative prompt; diffusion: the reverse, filters off."""
        var = _is_var(models.get(m, m))
        off = {} if var else {"value": 0}
        return (gr.update(visible=not var), gr.update(visible=not var),
                gr.update(visible=not var and kind == gen.TEXT, **({"value": ""} if var else {})),
                gr.update(visible=var, **off), gr.update(visible=var, **off))

    model.change(pick_family, model, [sampler, steps, negative, top_k, top_p], api_name=False)
    state = gr.State([])
    inputs = [model, what, negative, sampler, steps, cfg, seed, randomize, num, state, top_k, top_p]
    event = run.click(make_generate(kind, outputs_dir, device, models), inputs, [preview, gallery, status, state],
                      api_name={gen.CLASS: "class_to_image", gen.TEXT: "text_to_image", gen.VIDEO: "text_to_video"}[kind],
                      concurrency_id="generate")
    cancel.click(None, None, None, cancels=[event])
    dice.click(lambda: random.randint(0, MAX_SEED), None, seed, api_name=False)
    restore.upload(lambda f: restore_settings(f, kind), restore,
                   [model, what, negative, sampler, steps, cfg, seed, randomize, num, top_k, top_p], api_name=False)
    return preview, send


def _benchmark_tab(all_models: list[str], outputs_dir: Path, device: str | None) -> None:
    chosen = gr.CheckboxGroup(all_models, value=all_models[:2], label="models")
    with gr.Row():
        steps = gr.Slider(1, 100, value=25, step=1, label="steps")
        batch = gr.Slider(1, MAX_BATCH, value=1, step=1, label="batch")
        repeats = gr.Slider(1, 10, value=3, step=1, label="repeats")
    run = gr.Button("Run benchmark", variant="primary")
    table = gr.Dataframe(label="results")
    plot = gr.Image(label="plot", type="filepath")

    def handler(models, steps, batch, repeats):
        from app import bench

        try:
            if not models:
                raise ValueError("pick at least one model")
            result = bench.run_bench(models, steps=_number(steps, "steps", int, 1, 100),
                                     batch=_number(batch, "batch", int, 1, MAX_BATCH), size=None,
                                     device=device, dtype="float32", repeats=_number(repeats, "repeats", int, 1, 10))
            path = _outputs(outputs_dir) / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.png"
            bench.plot_bench(result, path)
            import pandas as pd

            rows = [{k: v for k, v in row.items() if not isinstance(v, (dict, list))} for row in result["rows"]]
            return pd.DataFrame(rows), str(path)
        except Exception as exc:  # noqa: BLE001
            raise _friendly(exc) from exc

    run.click(handler, [chosen, steps, batch, repeats], [table, plot], api_name="benchmark",
              concurrency_id="generate")


def _chat_models(models_directory) -> list[str]:
    """Names of the vision-language models the Chat tab offers (shipped, or in the models directory)."""
    from app.catalog import list_models

    return [m.name for m in list_models(Path(models_directory) if models_directory else None) if m.task == "vlm"]


def build_app(models_directory: str | Path | None = None, outputs_dir: str | Path = "outputs",
              device: str | None = None) -> gr.Blocks:
    """The whole app; `launch_app` serves it."""
    outputs_dir = Path(outputs_dir)
    by_kind = models_by_kind(Path(models_directory) if models_directory else None)
    with gr.Blocks(title="DiT Studio") as demo:
        gr.Markdown("# DiT Studio\nEfficient diffusion transformers on the shapes world — "
                    f"models from `{models_directory or models_dir()}`, results saved to `{outputs_dir}`.")
        vlms = _chat_models(models_directory)
        with gr.Tabs() as tabs:
            sends = []  # (result image, its "Send to Chat" button) of each image tab
            for kind in (gen.TEXT, gen.CLASS, gen.VIDEO):
                if by_kind[kind]:
                    with gr.Tab(KIND_TITLES[kind]):
                        sends.append(_task_tab(kind, by_kind[kind], outputs_dir, device, send_to_chat=bool(vlms)))
            if vlms:
                with gr.Tab("Chat", id="chat"):
                    from app.chat import build_chat_tab

                    chat = build_chat_tab(vlms, device)
                # a generated image goes to the chat's image box, and the Chat tab opens
                for result, send in sends:
                    if send is not None:
                        send.click(lambda path: (path, gr.Tabs(selected="chat")), result, [chat["image"], tabs],
                                   api_name=False)
            with gr.Tab("Benchmark"):
                _benchmark_tab([name for models in by_kind.values() for name, folder in models.items()
                                if not _is_var(folder)], outputs_dir, device)  # VAR: bench/var_speed.py
    concurrency = 2 if gen.check_device(device).startswith("cuda") else 1
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=concurrency)
    return demo


def launch_app(host: str = "127.0.0.1", port: int = 7860, models_directory=None, outputs_dir="outputs",
               device: str | None = None, share: bool = False, block: bool = True):
    """Serve the app; returns (demo, local URL)."""
    demo = build_app(models_directory, outputs_dir, device)
    Path(outputs_dir).mkdir(parents=True, exist_ok=True)
    _, url, _ = demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                            allowed_paths=[str(Path(outputs_dir).resolve())], quiet=True, show_error=True)
    return demo, url
