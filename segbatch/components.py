"""Connected components per class: how many separate objects of each class a mask holds.

Connectivity is the full neighbourhood: 8 in 2-D, 26 in 3-D. Two pixels of a class that touch
only at a corner are one object, which is how a rasterised diagonal line or a thin oblique
structure (a vessel crossing slices) should count; 4/6-connectivity would break such shapes
into many single pixels and inflate the counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

# Full-neighbourhood structuring elements, by number of dimensions.
_STRUCTURES = {ndim: np.ones((3,) * ndim, dtype=bool) for ndim in (2, 3)}


def count_components(mask: np.ndarray, class_ids: Sequence[int], min_px: int = 1) -> dict[int, int]:
    """Connected components of each class with at least ``min_px`` pixels (voxels).

    ``mask``: ``(H, W)`` or ``(X, Y, Z)`` integer class labels (nodata values are simply not
    among ``class_ids``). Returns ``{class_id: count}`` for every id in ``class_ids``, 0 for
    classes absent from the mask. Components smaller than ``min_px`` are dropped as noise.
    """
    mask = np.asarray(mask)
    if mask.ndim not in _STRUCTURES:
        raise ValueError(f"mask must be (H, W) or (X, Y, Z), got shape {mask.shape}")
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
        raise ValueError(f"mask must hold integer class labels, got {mask.dtype}")
    if min_px < 1:
        raise ValueError(f"min_px must be at least 1, got {min_px}")
    structure = _STRUCTURES[mask.ndim]
    counts: dict[int, int] = {}
    for class_id in class_ids:
        binary = mask == class_id
        if not binary.any():
            counts[int(class_id)] = 0
            continue
        labels, n_labels = ndimage.label(binary, structure=structure)
        if min_px == 1:
            counts[int(class_id)] = int(n_labels)
            continue
        sizes = np.bincount(labels.ravel(), minlength=n_labels + 1)[1:]  # [0] is background
        counts[int(class_id)] = int(np.count_nonzero(sizes >= min_px))
    return counts
