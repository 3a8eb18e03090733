"""bench/dydit_token_map.py's token geometry: a token's object share is the share of its image patch that the
analyser labels as an object, in the patchified (row-major) token order."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from dydit_token_map import token_object_share  # noqa: E402


def test_token_object_share_row_major():
    labels = np.full((16, 16), -1)
    labels[0:4, 4:8] = 0  # the whole patch of token (row 0, column 1) on a 4 x 4 grid
    labels[8:10, 12:16] = 1  # half of token (row 2, column 3)
    share = token_object_share(labels, 4)
    expected = np.zeros(16)
    expected[1], expected[2 * 4 + 3] = 1.0, 0.5
    np.testing.assert_allclose(share, expected)
