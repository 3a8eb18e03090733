"""dit.evaluation and the video frame metric: frame_prompt_accuracy on rendered videos (perfect, recoloured,
shuffled), the seeded prompt sets, evaluate_pipeline end to end on fake pipelines that render the right (or
wrong) answer, and the shipped c2i / t2i models' accuracy on a small CPU evaluation."""
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dit.dit import DiT
from dit.evaluation import TARGETS, _rng, caption_prompts, class_prompts, evaluate_pipeline, video_prompts
from dit.latte import LatteDiT
from dit.pixart import PixArtDiT
from shapes.analyse import analyse_batch
from shapes.data import eval_set
from shapes.metrics import frame_prompt_accuracy
from shapes.render import render
from shapes.scene import NUM_CLASSES, sample_class_scenes, sample_scenes
from shapes.text import as_parsed, caption, parse_caption

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ("n", "seed", "steps", "cfg", "sampler", "eval_seconds")


# ----- frame_prompt_accuracy -----
@pytest.fixture(scope="module")
def videos32():
    """eval_set("video", 32) with its per-video, per-frame detections (analysed once: the slow part)."""
    e = eval_set("video", 32)
    t = e["video"].shape[1]
    flat = analyse_batch(e["video"].reshape(-1, *e["video"].shape[2:]))
    return e, [flat[i:i + t] for i in range(0, len(flat), t)]


def test_frame_prompt_accuracy_is_one_on_the_rendered_videos(videos32):
    e, dets = videos32
    m = frame_prompt_accuracy(e["video"], e["caption"], dets)
    assert m["n"] == 32 * 8
    assert m["accuracy"] == 1.0 and m["video_accuracy"] == 1.0
    assert m["shape"] == m["colour"] == m["count"] == 1.0
    # the detections it computes itself agree with the ones passed in (a few videos, to keep it quick)
    assert frame_prompt_accuracy(e["video"][:4], e["caption"][:4]) == frame_prompt_accuracy(
        e["video"][:4], e["caption"][:4], dets[:4])


def test_frame_prompt_accuracy_drops_for_the_wrong_captions(videos32):
    e, dets = videos32
    shuffled = e["caption"][1:] + e["caption"][:1]  # every video against its neighbour's caption
    m = frame_prompt_accuracy(e["video"], shuffled, dets)
    assert m["accuracy"] < 0.4 and m["video_accuracy"] < 0.4, m
    # the same objects with their colours swapped among themselves: shapes right, colours mostly wrong
    recoloured = []
    for c in e["caption"]:
        p = parse_caption(c)
        objs = [replace(o, colour={"red": "blue"}.get(o.colour, "red"), colour2=None, motion=None) for o in p.objects]
        recoloured.append(replace(p, objects=objs))
    m = frame_prompt_accuracy(e["video"], recoloured, dets)
    assert m["shape"] == 1.0 and m["count"] == 1.0
    assert m["colour"] < 0.3 and m["accuracy"] < 0.3, m


def test_a_recolouring_object_counts_in_either_colour(videos32):
    e, _ = videos32
    specs = [parse_caption(c) for c in e["caption"]]
    recolour = [i for i, s in enumerate(specs) if any(o.colour2 for o in s.objects)]
    assert len(recolour) >= 3  # the set holds several (motion == recolour in the scenes)
    for i in recolour[:3]:
        first, last = e["video"][i:i + 1, :1], e["video"][i:i + 1, -1:]  # one-frame videos
        spec = specs[i]
        assert frame_prompt_accuracy(first, [spec])["accuracy"] == 1.0, e["caption"][i]
        assert frame_prompt_accuracy(last, [spec])["accuracy"] == 1.0, e["caption"][i]
        # the analyser really sees two colours: pinned to the start colour the last frame fails, and vice versa
        start = replace(spec, objects=[replace(o, colour2=None, motion=None) for o in spec.objects])
        end = replace(spec, objects=[replace(o, colour=o.colour2 or o.colour, colour2=None, motion=None)
                                     for o in spec.objects])
        assert frame_prompt_accuracy(first, [start])["accuracy"] == 1.0
        assert frame_prompt_accuracy(last, [start])["accuracy"] == 0.0, e["caption"][i]
        assert frame_prompt_accuracy(last, [end])["accuracy"] == 1.0
        assert frame_prompt_accuracy(first, [end])["accuracy"] == 0.0, e["caption"][i]


# ----- prompt sets -----
@pytest.mark.parametrize("n", [1, 47, 48, 100, 130])
def test_class_prompts_are_seeded_and_even(n):
    a = class_prompts(n, seed=0)
    assert a == class_prompts(n, seed=0) and len(a) == n
    assert all(isinstance(i, int) and 0 <= i < NUM_CLASSES for i in a)
    counts = np.bincount(a, minlength=NUM_CLASSES)
    assert counts.max() - counts.min() <= 1 and counts.min() == n // NUM_CLASSES
    if n > 1:
        assert class_prompts(n, seed=1) != a


@pytest.mark.parametrize("k", [1, 2, 3])
def test_caption_prompts_state_k_objects(k):
    caps = caption_prompts(20, k, seed=0)
    assert caps == caption_prompts(20, k, seed=0) and caps != caption_prompts(20, k, seed=1)
    assert len(set(caps)) > 15
    for c in caps:
        p = as_parsed(c)
        assert len(p.objects) == k, c
        assert all(o.shape and o.colour for o in p.objects), c
    assert video_prompts(6, seed=2) == eval_set("video", 6, seed=2)["caption"]


# ----- evaluate_pipeline on fake pipelines -----
class FakeClassPipe:
    """Renders the asked-for class (shifted by `offset`): a perfect (offset 0) or always-wrong generator."""

    def __init__(self, offset=0):
        torch.manual_seed(0)
        self.transformer = DiT(sample_size=16, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                               num_classes=48)
        self._execution_device = torch.device("cpu")
        self.offset, self.calls, self.samplers = offset, [], []

    def set_sampler(self, name):
        self.samplers.append(name)
        return self

    def __call__(self, labels, num_inference_steps, guidance_scale, generator, output_type):
        self.calls.append((list(labels), num_inference_steps, guidance_scale, generator.initial_seed(), output_type))
        shown = (np.asarray(labels) + self.offset) % NUM_CLASSES
        images = render(sample_class_scenes(np.random.default_rng(generator.initial_seed()), labels=shown), 64)
        return SimpleNamespace(images=images.float() / 255)


def test_evaluate_pipeline_class_perfect_and_wrong():
    pipe = FakeClassPipe()
    out = evaluate_pipeline(pipe, n=48, seed=5, steps=7, cfg=2.5, sampler="euler", batch_size=20)
    assert set(TARGETS["class"]) <= out.keys() and all(k in out for k in SETTINGS)
    assert (out["n"], out["seed"], out["steps"], out["cfg"], out["sampler"]) == (48, 5, 7, 2.5, "euler")
    assert out["prompt_accuracy"] == 1.0 and out["shape"] == out["colour"] == out["count"] == 1.0
    assert pipe.samplers == ["euler"]
    # batches of 20 in prompt order, batch i's noise from seed + i, the settings passed through
    assert [c[0] for c in pipe.calls] == [class_prompts(48, 5)[s:s + 20] for s in (0, 20, 40)]
    assert [c[3] for c in pipe.calls] == [5, 6, 7]
    assert all(c[1:3] == (7, 2.5) and c[4] == "pt" for c in pipe.calls)

    wrong = evaluate_pipeline(FakeClassPipe(offset=1), n=48, seed=5, steps=7, cfg=2.5, sampler=None)
    assert wrong["prompt_accuracy"] <= 0.05 and wrong["colour"] <= 0.05, wrong  # label+1: the next colour
    with pytest.raises(ValueError):
        evaluate_pipeline(pipe, n=0)


class FakeTextPipe:
    """Renders the scene each caption_prompts caption was written from (rebuilt from the same seeded stream)."""

    def __init__(self, n, seed):
        self.transformer = PixArtDiT(sample_size=16, patch_size=2, in_channels=4, hidden_size=32, depth=1,
                                     num_heads=2, caption_channels=96, max_text_tokens=32)
        self._execution_device = torch.device("cpu")
        self.images = {}
        for k in (1, 2):
            rng = _rng(seed, f"caption{k}")
            b = sample_scenes(rng, n, k, k)
            caps = [caption(s, rng) for s in b.to_scenes()]
            self.images.update(zip(caps, render(b, 64)))

    def set_sampler(self, name):
        return self

    def __call__(self, prompts, num_inference_steps, guidance_scale, generator, output_type):
        return SimpleNamespace(images=torch.stack([self.images[p] for p in prompts]).float() / 255)


def test_evaluate_pipeline_text_with_a_perfect_fake():
    out = evaluate_pipeline(FakeTextPipe(16, 2), n=16, seed=2, steps=3)
    assert set(TARGETS["text"]) <= out.keys() and all(k in out for k in SETTINGS)
    assert (out["n"], out["seed"], out["steps"]) == (16, 2, 3)
    assert out["one_object_accuracy"] == 1.0
    assert out["two_object_accuracy"] >= 0.9, out  # the analyser on rendered two-object scenes (occlusion aside)


class FakeVideoPipe:
    """Returns the reference video of each caption of eval_set("video", n, seed)."""

    def __init__(self, n, seed):
        self.transformer = LatteDiT(sample_size=16, patch_size=2, in_channels=4, hidden_size=32, depth=1,
                                    num_heads=2, caption_channels=96, max_text_tokens=32, num_frames=8)
        self._execution_device = torch.device("cpu")
        e = eval_set("video", n, seed)
        self.videos = dict(zip(e["caption"], e["video"]))
        self.batches = []

    def set_sampler(self, name):
        return self

    def __call__(self, prompts, num_inference_steps, guidance_scale, generator, output_type):
        self.batches.append(len(prompts))
        return SimpleNamespace(frames=torch.stack([self.videos[p] for p in prompts]).float() / 255)


def test_evaluate_pipeline_video_with_a_perfect_fake():
    pipe = FakeVideoPipe(10, 4)
    out = evaluate_pipeline(pipe, n=10, seed=4, steps=2, batch_size=32)
    assert pipe.batches == [4, 4, 2]  # batch_size // num_frames videos per call
    assert set(TARGETS["video"]) <= out.keys() and all(k in out for k in SETTINGS)
    assert (out["n"], out["seed"], out["steps"]) == (10, 4, 2)
    assert out["motion_accuracy"] == 1.0 and out["frame_prompt_accuracy"] == 1.0, out
    assert out["video_all_right"] == 1.0 and out["frame_count"] == 1.0


# ----- the shipped models -----
def _shipped(name):
    return pytest.mark.skipif(not (REPO / "weights" / name / "model_index.json").is_file(),
                              reason=f"weights/{name} not shipped")


@pytest.mark.slow
@_shipped("shapes-c2i")
def test_shipped_c2i_accuracy():
    from dit.pipelines import ClassToImagePipeline

    pipe = ClassToImagePipeline.from_pretrained(REPO / "weights" / "shapes-c2i")
    pipe.set_progress_bar_config(disable=True)
    out = evaluate_pipeline(pipe, n=C2I_N, seed=0, steps=25, cfg=4.0, sampler="dpm++")
    assert out["prompt_accuracy"] >= C2I_MIN, out


@pytest.mark.slow
@_shipped("shapes-t2i")
def test_shipped_t2i_accuracy():
    from dit.text_pipelines import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(REPO / "weights" / "shapes-t2i")
    pipe.set_progress_bar_config(disable=True)
    out = evaluate_pipeline(pipe, n=T2I_N, seed=0, steps=25, cfg=4.0, sampler="dpm++")
    assert out["one_object_accuracy"] >= T2I_MIN, out


# Measured on 2 CPU threads (steps 25, cfg 4, dpm++, seed 0): c2i n=48 -> 0.9375 (124 s under load), n=8 -> 1.0
# (25 s); t2i n=8 -> one_object_accuracy 1.0. n is kept small for CPU time; the card's n=480 gives 0.91.
C2I_N, C2I_MIN = 8, 0.85
T2I_N, T2I_MIN = 8, 0.75
