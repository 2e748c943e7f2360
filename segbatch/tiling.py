"""Sliding-window inference with blending, and streaming of scenes larger than memory.

Pure torch/numpy, no Ray: the predictor calls these with its model's ``forward``. The scheme is
the one of MONAI's ``inferers/utils.py`` and nnU-Net: a regular grid of equal-sized tiles whose
last tile sits flush with the image's end, each tile's logits weighted by a blending map (a
centred Gaussian by default) and the weighted sums divided by the summed weights.

Two entry points share one grid, one weighting and one order of accumulation:

- :func:`sliding_window_logits` holds the whole ``(K, H, W)`` logits of one image;
- :func:`segment_scene` never does: it walks the scene in column segments and, inside each,
  tile row by tile row, handing out finished argmax blocks as soon as no later tile can change
  them. Its memory is ``O(K * tile * segment_width)`` whatever the scene's size, and its masks
  equal ``sliding_window_logits(...).argmax(0)`` bit for bit (see ``docs/large-scenes.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from segbatch.config import TilingConfig
from segbatch.logits import argmax_classes

Window = tuple[int, int, int, int]  # (y0, x0, h, w) in pixels of the whole image


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of the tiles along one axis, ascending.

    The stride is ``max(1, round(tile * (1 - overlap)))``; the last tile is flush with the end
    (``length - tile``) rather than padded past it, so every tile holds real pixels only. An axis
    no longer than the tile gets one tile, ``[0]`` (that tile is then ``length`` long).
    """
    if length <= 0 or tile <= 0:
        raise ValueError(f"length ({length}) and tile ({tile}) must be positive")
    if length <= tile:
        return [0]
    stride = max(1, round(tile * (1 - overlap)))
    last = length - tile
    starts = list(range(0, last, stride))
    starts.append(last)
    return starts


def tile_windows(height: int, width: int, tile_size_px: int, overlap: float) -> list[Window]:
    """The tile grid of an image as ``(y0, x0, h, w)`` windows, row-major.

    ``h = min(tile_size_px, height)`` and ``w = min(tile_size_px, width)``: all tiles of one
    image have the same size, so they stack into one batch.
    """
    h, w = min(tile_size_px, height), min(tile_size_px, width)
    return [
        (y0, x0, h, w)
        for y0 in tile_starts(height, tile_size_px, overlap)
        for x0 in tile_starts(width, tile_size_px, overlap)
    ]


def blend_weights(h: int, w: int, blend: str, sigma_frac: float = 0.125) -> torch.Tensor:
    """The per-pixel weight of one tile's logits: ``(h, w)`` float32, maximum 1.

    ``"constant"``: ones (a plain average of the overlapping tiles). ``"gaussian"``: as MONAI's
    ``compute_importance_map`` and nnU-Net, a separable Gaussian centred on the tile with
    ``sigma = sigma_frac * size`` per axis, normalised to a maximum of 1. Tile borders, where a
    model sees the least context, then count little where another tile covers them. Weights
    are floored at 1e-3 so that pixels covered only by tile corners (the image's corners)
    never divide by a vanishing sum.
    """
    if blend == "constant":
        return torch.ones(h, w, dtype=torch.float32)
    if blend != "gaussian":
        raise ValueError(f"unknown blend {blend!r}; use 'gaussian' or 'constant'")
    axes = []
    for n in (h, w):
        # Offsets from the centre, (n - 1) / 2, are exact halves or integers in float64, so the
        # profile is exactly symmetric.
        offsets = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        sigma = sigma_frac * n
        axes.append(torch.exp(-(offsets**2) / (2 * sigma**2)))
    weights = axes[0][:, None] * axes[1][None, :]
    weights = weights / weights.max()
    return weights.clamp_(min=1e-3).to(torch.float32)


def needs_tiling(height: int, width: int, cfg: TilingConfig) -> bool:
    """Whether an image of this size goes through the sliding window.

    ``enabled: true`` always, ``false`` never, ``"auto"`` when either side exceeds the tile.
    """
    if cfg.enabled is True:
        return True
    if cfg.enabled is False:
        return False
    return height > cfg.tile_size_px or width > cfg.tile_size_px


def _forward_tiles(
    forward: Callable[[torch.Tensor], torch.Tensor], tiles: torch.Tensor
) -> torch.Tensor:
    """``forward`` on a ``(B, C, h, w)`` batch, checked and cast: ``(B, K, h, w)`` float32."""
    logits = forward(tiles)
    b, _, h, w = tiles.shape
    if logits.ndim != 4 or logits.shape[0] != b or tuple(logits.shape[2:]) != (h, w):
        raise ValueError(
            f"the model returned logits of shape {tuple(logits.shape)} for tiles of shape "
            f"{tuple(tiles.shape)}; sliding-window inference needs (B, K, h, w) at the tile's size"
        )
    # Half-precision models still blend in float32: sums of many weighted tiles lose too much
    # in fp16/bf16, and one dtype keeps both entry points bit-identical.
    return logits.float()


def _accumulate(
    numer: torch.Tensor,
    denom: torch.Tensor,
    logits: torch.Tensor,
    weights: torch.Tensor,
    dst: tuple[int, int, int, int],
    src: tuple[int, int],
) -> None:
    """Add ``weights * logits`` of one tile into ``numer`` and ``weights`` into ``denom``.

    ``logits`` is ``(K, h, w)``; ``dst = (y0, x0, rows, cols)`` is the target region in the
    accumulators, ``src = (sy, sx)`` where that region starts inside the tile. Both entry points
    go through here, one tile at a time in row-major grid order, so every pixel sees the same
    float operations in the same order: the product is formed first and then added (never a
    fused multiply-add), starting from zeros.
    """
    y0, x0, rows, cols = dst
    sy, sx = src
    w = weights[sy : sy + rows, sx : sx + cols]
    numer[:, y0 : y0 + rows, x0 : x0 + cols] += logits[:, sy : sy + rows, sx : sx + cols] * w
    denom[y0 : y0 + rows, x0 : x0 + cols] += w


def sliding_window_logits(
    x: torch.Tensor,
    forward: Callable[[torch.Tensor], torch.Tensor],
    cfg: TilingConfig,
) -> torch.Tensor:
    """Blended sliding-window logits of one whole image.

    ``x``: ``(C, H, W)`` float, normalized, on the model's device. ``forward``: ``(B, C, h, w)
    -> (B, K, h, w)`` logits, called with at most ``cfg.batch_tiles`` tiles at a time. Returns
    ``(K, H, W)`` float32 on ``x``'s device, ``sum_t w_t * logits_t / sum_t w_t`` over the tiles
    ``t`` covering each pixel. Holds the full logits: for scenes that do not fit, use
    :func:`segment_scene`.
    """
    if x.ndim != 3:
        raise ValueError(f"expected a (C, H, W) image, got shape {tuple(x.shape)}")
    _, height, width = x.shape
    windows = tile_windows(height, width, cfg.tile_size_px, cfg.overlap)
    th, tw = windows[0][2], windows[0][3]
    weights = blend_weights(th, tw, cfg.blend).to(x.device)
    numer: torch.Tensor | None = None
    denom = torch.zeros(height, width, dtype=torch.float32, device=x.device)
    for first in range(0, len(windows), cfg.batch_tiles):
        batch = windows[first : first + cfg.batch_tiles]
        tiles = torch.stack([x[:, y0 : y0 + h, x0 : x0 + w] for y0, x0, h, w in batch])
        logits = _forward_tiles(forward, tiles)
        if numer is None:  # K is known only once the model has answered
            numer = torch.zeros(
                logits.shape[1], height, width, dtype=torch.float32, device=x.device
            )
        for (y0, x0, h, w), tile_logits in zip(batch, logits, strict=True):
            _accumulate(numer, denom, tile_logits, weights, (y0, x0, h, w), (0, 0))
    assert numer is not None  # the grid always has at least one tile
    return numer / denom


def segment_columns(
    width: int, tile_size_px: int, overlap: float, segment_width_px: int
) -> list[tuple[int, int]]:
    """Split ``[0, width)`` into column segments ``[c0, c1)`` of at most ``segment_width_px``.

    Boundaries sit on tile starts of the global grid where one fits (the largest start within
    ``segment_width_px`` of the segment's left edge): only the tiles straddling a boundary are
    then computed twice, one per boundary when the overlap is at most a half (none without
    overlap). Where no start fits (a segment narrower than the stride) the cut is made at
    ``c0 + segment_width_px``; the masks stay exact, only more tiles are shared.
    """
    if segment_width_px < 1:
        raise ValueError(f"segment_width_px must be at least 1, got {segment_width_px}")
    starts = tile_starts(width, tile_size_px, overlap)
    segments = []
    c0 = 0
    while c0 < width:
        limit = c0 + segment_width_px
        if limit >= width:
            c1 = width
        else:
            fitting = [s for s in starts if c0 < s <= limit]
            c1 = fitting[-1] if fitting else limit
        segments.append((c0, c1))
        c0 = c1
    return segments


def segment_scene(
    height: int,
    width: int,
    read_tiles: Callable[[list[Window]], torch.Tensor],
    forward: Callable[[torch.Tensor], torch.Tensor],
    write_block: Callable[[int, int, np.ndarray], None],
    cfg: TilingConfig,
    segment_width_px: int = 4096,
) -> None:
    """Segment a scene too large for memory, block by block; the argmax of blended logits.

    ``read_tiles``: a list of at most ``cfg.batch_tiles`` windows ``(y0, x0, h, w)`` of the
    global tile grid, all the same size -> ``(B, C, h, w)`` normalized float tensor on the
    model's device. ``forward``: ``(B, C, h, w) -> (B, K, h, w)`` logits. ``write_block``:
    ``(y0, x0, mask)`` with ``mask`` a ``(bh, bw)`` int64 numpy array of class indices, called
    once per finished block; the blocks tile the scene exactly once (row blocks of at most one
    tile's height, at most ``segment_width_px`` wide, top to bottom within a column segment,
    segments left to right).

    The scene is split into column segments (:func:`segment_columns`). Within one, the tiles of
    the global grid touching it are run in row-major order and added, cropped to the segment,
    into an accumulator one tile high. Once tile row ``i`` is in, the rows above tile row
    ``i + 1``'s start are final (no later tile reaches them): they are divided, argmaxed and
    written, and the remaining rows move up. Every pixel thus receives the same tiles, weights
    and float operations in the same order as in :func:`sliding_window_logits`, so the masks
    are identical to ``sliding_window_logits(...).argmax(0)`` as long as ``forward`` gives a tile
    the same logits whatever batch it comes in.

    Memory: accumulators of ``(K + 1) * min(tile, H) * segment_width`` float32, one batch of
    tiles and their logits, and one written block, independent of the scene's size.
    """
    tile, overlap = cfg.tile_size_px, cfg.overlap
    row_starts = tile_starts(height, tile, overlap)
    col_starts = tile_starts(width, tile, overlap)
    th, tw = min(tile, height), min(tile, width)
    weights_cpu = blend_weights(th, tw, cfg.blend)

    for c0, c1 in segment_columns(width, tile, overlap, segment_width_px):
        seg_w = c1 - c0
        cols = [x0 for x0 in col_starts if x0 < c1 and x0 + tw > c0]
        # Row-major over the global grid restricted to this segment: the per-pixel order of
        # sliding_window_logits.
        windows = [(y0, x0, th, tw) for y0 in row_starts for x0 in cols]
        stream = _SegmentStream(height, c0, seg_w, th, row_starts, write_block)
        for first in range(0, len(windows), cfg.batch_tiles):
            batch = windows[first : first + cfg.batch_tiles]
            tiles = read_tiles(batch)
            if tuple(tiles.shape[:1]) + tuple(tiles.shape[2:]) != (len(batch), th, tw):
                raise ValueError(
                    f"read_tiles returned shape {tuple(tiles.shape)} for {len(batch)} windows "
                    f"of {th}x{tw}; expected (B, C, {th}, {tw})"
                )
            logits = _forward_tiles(forward, tiles)
            if stream.weights is None:
                stream.start(logits.shape[1], weights_cpu.to(logits.device), logits.device)
            for window, tile_logits in zip(batch, logits, strict=True):
                stream.add(window, tile_logits)
        stream.finish()


class _SegmentStream:
    """The row-streaming accumulator of one column segment of :func:`segment_scene`.

    Holds ``numer`` ``(K, th, seg_w)`` and ``denom`` ``(th, seg_w)`` float32 covering image rows
    ``[top, top + th)`` of columns ``[c0, c0 + seg_w)``. ``top`` is always the start of the tile
    row being added, so a tile's rows always fall inside the buffer.
    """

    def __init__(
        self,
        height: int,
        c0: int,
        seg_w: int,
        th: int,
        row_starts: Sequence[int],
        write_block: Callable[[int, int, np.ndarray], None],
    ) -> None:
        self.height, self.c0, self.seg_w, self.th = height, c0, seg_w, th
        self.row_starts = list(row_starts)
        self.row_index = 0  # the tile row being accumulated
        self.write_block = write_block
        self.weights: torch.Tensor | None = None
        self.numer = torch.empty(0)
        self.denom = torch.empty(0)

    def start(self, num_classes: int, weights: torch.Tensor, device: torch.device) -> None:
        """Allocate the accumulators once the model has told the number of classes."""
        self.weights = weights
        self.numer = torch.zeros(
            num_classes, self.th, self.seg_w, dtype=torch.float32, device=device
        )
        self.denom = torch.zeros(self.th, self.seg_w, dtype=torch.float32, device=device)

    @property
    def top(self) -> int:
        return self.row_starts[self.row_index]

    def add(self, window: Window, logits: torch.Tensor) -> None:
        """Add one tile's ``(K, th, tw)`` float32 logits, cropped to the segment."""
        assert self.weights is not None
        y0, x0, _, w = window
        while y0 != self.top:  # the grid moved on to the next tile row
            self._advance()
        lo, hi = max(x0, self.c0), min(x0 + w, self.c0 + self.seg_w)
        _accumulate(
            self.numer,
            self.denom,
            logits,
            self.weights,
            (0, lo - self.c0, self.th, hi - lo),
            (0, lo - x0),
        )

    def _emit(self, rows: int) -> None:
        """Write the first ``rows`` buffer rows, which no later tile touches."""
        # Divided in place: these rows are overwritten by the shift next, and a divided copy
        # would briefly double the accumulator.
        block = argmax_classes(self.numer[:, :rows].div_(self.denom[:rows]))
        self.write_block(self.top, self.c0, block.cpu().numpy().astype(np.int64, copy=False))

    def _advance(self) -> None:
        """Emit the rows above the next tile row's start and move the rest up."""
        step = self.row_starts[self.row_index + 1] - self.top
        self._emit(step)
        keep = self.th - step
        # An in-place shift, in chunks of at most ``step`` rows so that no copy reads rows it
        # has just overwritten: no second buffer, whatever the overlap.
        for dst in range(0, keep, step):
            n = min(step, keep - dst)
            self.numer[:, dst : dst + n] = self.numer[:, dst + step : dst + step + n]
            self.denom[dst : dst + n] = self.denom[dst + step : dst + step + n]
        self.numer[:, keep:] = 0
        self.denom[keep:] = 0
        self.row_index += 1

    def finish(self) -> None:
        """Emit the last tile row, which ends flush with the scene."""
        # Every tile row has a tile in every segment, so the last one has been reached.
        assert self.weights is not None and self.row_index == len(self.row_starts) - 1
        self._emit(self.height - self.top)
