"""Connected components per class (segbatch.components)."""

from __future__ import annotations

import numpy as np
import pytest

from segbatch.components import count_components


@pytest.fixture
def two_squares_and_a_dot() -> np.ndarray:
    """Class 1: a 4x4 and a 3x3 square and a one-pixel blob; class 2: one 2x5 bar."""
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[1:5, 1:5] = 1
    mask[10:13, 10:13] = 1
    mask[17, 2] = 1
    mask[15:17, 12:17] = 2
    mask[0, 19] = 255  # nodata: never a class
    return mask


def test_counts_every_component(two_squares_and_a_dot: np.ndarray) -> None:
    got = count_components(two_squares_and_a_dot, [0, 1, 2, 3])
    assert got == {0: 1, 1: 3, 2: 1, 3: 0}


def test_min_px_drops_small_components(two_squares_and_a_dot: np.ndarray) -> None:
    mask = two_squares_and_a_dot
    assert count_components(mask, [1, 2], min_px=2) == {1: 2, 2: 1}
    assert count_components(mask, [1, 2], min_px=9) == {1: 2, 2: 1}  # the 3x3 has exactly 9
    assert count_components(mask, [1, 2], min_px=10) == {1: 1, 2: 1}  # the bar has 10
    assert count_components(mask, [1, 2], min_px=11) == {1: 1, 2: 0}
    assert count_components(mask, [1, 2], min_px=17) == {1: 0, 2: 0}


def test_diagonal_neighbours_are_one_component_in_2d() -> None:
    mask = np.eye(6, dtype=np.uint8)  # a diagonal line: pixels touch only at corners
    mask[0, 5] = 1  # far from the line
    assert count_components(mask, [1]) == {1: 2}
    # With 4-connectivity this would be 7 components; the line is one object.


def test_3d_uses_26_connectivity() -> None:
    mask = np.zeros((5, 5, 5), dtype=np.uint16)
    for i in range(4):
        mask[i, i, i] = 3  # a body diagonal: voxels share only a corner
    mask[0, 4, 4] = 3
    mask[2:5, 0:2, 3:5] = 7
    assert count_components(mask, [3, 7]) == {3: 2, 7: 1}
    assert count_components(mask, [3, 7], min_px=2) == {3: 1, 7: 1}


def test_classes_are_counted_separately_even_when_touching() -> None:
    mask = np.zeros((4, 8), dtype=np.uint8)
    mask[:, 0:4] = 1
    mask[:, 4:8] = 2
    assert count_components(mask, [1, 2]) == {1: 1, 2: 1}


@pytest.mark.parametrize(
    ("mask", "min_px", "match"),
    [
        (np.zeros(5, dtype=np.uint8), 1, "shape"),
        (np.zeros((2, 2, 2, 2), dtype=np.uint8), 1, "shape"),
        (np.zeros((3, 3), dtype=np.float32), 1, "integer"),
        (np.zeros((3, 3), dtype=np.uint8), 0, "min_px"),
    ],
)
def test_rejects_bad_input(mask: np.ndarray, min_px: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        count_components(mask, [1], min_px=min_px)
