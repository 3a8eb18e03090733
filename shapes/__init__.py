"""The shapes world: procedural scenes rendered as images, captions, videos, control maps and visual questions,
an exact analyser of generated images, and the metrics every method is measured with."""

from .analyse import Analysis, Detection, analyse, analyse_batch, analyse_full, analyse_video, fit_background
from .control import CONTROL_KINDS, ControlMaps, control_maps, control_rgb, maps_from_image, rgb_to_raw
from .data import KINDS, ShapesStream, eval_set, generation_speed, make_batch, render_speed, stream
from .metrics import (
    analyser_agreement,
    classify_motion,
    control_fidelity,
    degrade,
    feature_stats,
    frechet_distance,
    frechet_distance_images,
    image_features,
    iou,
    load_stats,
    mean_abs_error,
    mean_iou,
    motion_accuracy,
    frame_prompt_accuracy,
    prompt_accuracy,
    psnr,
    save_stats,
    score_sample,
    track_objects,
    vqa_accuracy,
)
from .render import render, render_layers, render_video, to_float, to_numpy_hwc, to_uint8
from .scene import (
    BACKGROUNDS,
    CELLS,
    CLASS_NAMES,
    COLOURS,
    MOTIONS,
    NULL_CLASS,
    NUM_CLASSES,
    PALETTE,
    SHAPES,
    SIZES,
    Background,
    Obj,
    Scene,
    SceneBatch,
    class_name,
    class_to_id,
    id_to_class,
    sample_class_scenes,
    sample_scenes,
    sample_tiny_scenes,
    sample_video_scenes,
    scenes_at,
)
from .text import ParsedCaption, ParsedObject, as_parsed, caption, captions, class_caption, parse_caption, video_caption
from .vqa import QA, QUESTION_KINDS, make_question, make_questions, normalise_answer
