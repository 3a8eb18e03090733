"""bench/t2v_direction_eval.py's measurement chain on rendered videos (no model): its captions parse back to the
scene's motion (and start cell when asked), and its tracker reads the rendered motions right."""
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import t2v_direction_eval as bench  # noqa: E402

from shapes.render import render_video  # noqa: E402
from shapes.scene import MOTIONS, sample_video_scenes  # noqa: E402
from shapes.text import parse_caption  # noqa: E402


def test_captions_and_tracker_read_the_rendered_directions():
    n = 16
    motions = np.array([[MOTIONS.index(bench.DIRECTIONS[i % 4])] for i in range(n)])
    batch = sample_video_scenes(np.random.default_rng(0), n, 1, 1, motions=motions)
    scenes = batch.to_scenes()
    for with_position in (False, True):
        for s, cap in zip(scenes, bench.direction_captions(scenes, with_position)):
            p = parse_caption(cap).objects[0]
            assert (p.shape, p.colour, p.motion) == (s.objects[0].shape, s.objects[0].colour, s.objects[0].motion)
            assert p.cell == (s.objects[0].cell if with_position else None), cap
    got = bench.tracked_motions(render_video(batch, 8, 64))
    assert np.mean([g == s.objects[0].motion for g, s in zip(got, scenes)]) >= 0.9, got
