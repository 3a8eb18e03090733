"""The shapes world: procedural scenes rendered as images, captions, videos, control maps and visual questions,
an exact analyser of generated images, and the metrics every method is measured with."""
