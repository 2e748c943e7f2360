"""Sliding-window inference: the grid, the blending weights, and exactness against references.

Two seeded models serve as references:

- a pointwise model (the weights of a random 1x1 ``Conv2d``, 3 -> 5 channels) for which tiling
  cannot change anything: every tile sees the same value at a pixel, so the blended logits are a
  weighted mean of identical numbers and the masks equal the untiled ``model(x).argmax``;
- a small CNN of three 3x3 convolutions, whose logits do depend on the tile (padding at tile
  borders), to check that ``segment_scene`` reproduces ``sliding_window_logits`` on the same grid.

torch's CPU convolutions pick kernels by batch size and may differ in the last bit between a batch
of 1 and of 7. The tiling code must not add any such dependence, so exactness tests use models
that are batch-invariant by construction (explicit per-channel sums; the CNN run one tile at a
time); the plain batched CNN is checked to agree on at least 99.99% of pixels.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest
import torch

from segbatch.config import TilingConfig
from segbatch.tiling import (
    blend_weights,
    needs_tiling,
    segment_columns,
    segment_scene,
    sliding_window_logits,
    tile_starts,
    tile_windows,
)

Forward = Callable[[torch.Tensor], torch.Tensor]


@pytest.fixture(autouse=True)
def _inference_mode():
    """The caller (the predictor) runs tiling under inference mode; so do the tests."""
    with torch.inference_mode():
        yield


def pointwise_model(in_ch: int = 3, out_ch: int = 5, seed: int = 0) -> Forward:
    """A random 1x1 conv as explicit per-channel sums: ``(B, C, h, w) -> (B, K, h, w)``.

    Each output pixel is ``b + sum_c w_c * x_c`` in a fixed order, whatever the batch.
    """
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(in_ch, out_ch, 1)
    weight = conv.weight.detach()[:, :, 0, 0].clone()  # (K, C)
    bias = conv.bias.detach().clone()  # (K,)

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = bias[None, :, None, None].expand(x.shape[0], -1, x.shape[2], x.shape[3])
        for c in range(in_ch):
            out = out + weight[None, :, c, None, None] * x[:, c : c + 1]
        return out

    return forward


def small_cnn(seed: int = 0) -> torch.nn.Module:
    """Three seeded 3x3 convs, 3 -> 8 -> 8 -> 5 channels, zero padding."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 5, 3, padding=1),
    ).eval()


def one_tile_at_a_time(model: Forward) -> Forward:
    """``model`` applied tile by tile, so its logits never depend on the batch."""
    return lambda x: torch.cat([model(x[i : i + 1]) for i in range(x.shape[0])])


def image(height: int, width: int, seed: int = 1) -> torch.Tensor:
    """A seeded ``(3, H, W)`` float32 normalized image."""
    return torch.randn(3, height, width, generator=torch.Generator().manual_seed(seed))


def run_scene(
    x: torch.Tensor,
    forward: Forward,
    cfg: TilingConfig,
    segment_width_px: int,
    windows_read: list[list[tuple[int, int, int, int]]] | None = None,
    blocks: list[tuple[int, int, int, int]] | None = None,
) -> np.ndarray:
    """``segment_scene`` on an in-memory image; the mask assembled from ``write_block``.

    Checks that every pixel is written exactly once. Optionally records each ``read_tiles``
    request and each block as ``(y0, x0, bh, bw)``.
    """
    _, height, width = x.shape
    mask = np.full((height, width), -1, dtype=np.int64)
    writes = np.zeros((height, width), dtype=np.int64)

    def read_tiles(windows: list[tuple[int, int, int, int]]) -> torch.Tensor:
        if windows_read is not None:
            windows_read.append(list(windows))
        return torch.stack([x[:, y0 : y0 + h, x0 : x0 + w] for y0, x0, h, w in windows])

    def write_block(y0: int, x0: int, block: np.ndarray) -> None:
        assert block.dtype == np.int64 and block.ndim == 2
        bh, bw = block.shape
        mask[y0 : y0 + bh, x0 : x0 + bw] = block
        writes[y0 : y0 + bh, x0 : x0 + bw] += 1
        if blocks is not None:
            blocks.append((y0, x0, bh, bw))

    segment_scene(height, width, read_tiles, forward, write_block, cfg, segment_width_px)
    assert (writes == 1).all(), "every pixel must be written exactly once"
    return mask


# --- the grid ---------------------------------------------------------------------------------


def test_tile_starts_stride_and_flush_end():
    assert tile_starts(100, 32, 0.25) == [0, 24, 48, 68]  # stride round(24), last flush at 68
    assert tile_starts(96, 32, 0.0) == [0, 32, 64]  # exact fit: no extra tile
    assert tile_starts(97, 32, 0.0) == [0, 32, 64, 65]
    assert tile_starts(32, 32, 0.5) == [0]
    assert tile_starts(10, 32, 0.5) == [0]  # shorter than the tile: one (short) tile
    assert tile_starts(5, 4, 0.99) == [0, 1]  # stride never below 1


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("tile", [16, 50, 64])
def test_tile_windows_cover_every_pixel(tile: int, overlap: float):
    for height, width in [(97, 131), (40, 200), (10, 7), (64, 64), (65, 300)]:
        windows = tile_windows(height, width, tile, overlap)
        cover = np.zeros((height, width), dtype=np.int64)
        for y0, x0, h, w in windows:
            assert (h, w) == (min(tile, height), min(tile, width))  # one size per image
            assert y0 >= 0 and y0 + h <= height and x0 >= 0 and x0 + w <= width
            cover[y0 : y0 + h, x0 : x0 + w] += 1
        assert cover.min() >= 1
        assert windows == sorted(windows)  # row-major
        expected_stride = max(1, round(tile * (1 - overlap)))
        starts = tile_starts(width, tile, overlap)
        steps = [b - a for a, b in itertools.pairwise(starts)]
        # A regular stride, then a last step of at most one stride to end flush.
        assert all(step == expected_stride for step in steps[:-1])
        assert all(0 < step <= expected_stride for step in steps[-1:])


# --- blending weights -------------------------------------------------------------------------


@pytest.mark.parametrize(("h", "w"), [(64, 64), (33, 50), (1024, 17)])
def test_gaussian_weights_symmetric_peak_one_positive(h: int, w: int):
    weights = blend_weights(h, w, "gaussian")
    assert weights.shape == (h, w) and weights.dtype == torch.float32
    assert torch.equal(weights, weights.flip(0)) and torch.equal(weights, weights.flip(1))
    assert weights.max().item() == 1.0
    centre = weights[(h - 1) // 2 : h // 2 + 1, (w - 1) // 2 : w // 2 + 1]
    assert torch.all(centre == 1.0)
    assert weights.min().item() >= 1e-3  # the floor: corners never divide by ~0
    # sigma = tile / 8 as in MONAI and nnU-Net: 801 px wide, sigma = 100.125 px.
    row = blend_weights(1, 801, "gaussian")[0]
    assert row[400 + 100].item() == pytest.approx(np.exp(-(100**2) / (2 * 100.125**2)), rel=1e-6)
    assert row[100].item() == pytest.approx(np.exp(-(300**2) / (2 * 100.125**2)), rel=1e-5)
    assert row[0].item() == pytest.approx(1e-3)  # exp(-8) = 3.4e-4 at the edge, floored
    # Falls off monotonically from the centre towards the edges.
    half = weights[(h - 1) // 2, (w - 1) // 2 :]
    assert torch.all(half[1:] <= half[:-1])


def test_constant_weights_and_unknown_blend():
    assert torch.equal(blend_weights(5, 7, "constant"), torch.ones(5, 7))
    with pytest.raises(ValueError, match="unknown blend"):
        blend_weights(5, 7, "cosine")


def test_needs_tiling():
    assert needs_tiling(10, 10, TilingConfig(enabled=True))
    assert not needs_tiling(5000, 5000, TilingConfig(enabled=False))
    auto = TilingConfig(enabled="auto", tile_size_px=512)
    assert not needs_tiling(512, 512, auto)
    assert needs_tiling(513, 100, auto) and needs_tiling(100, 513, auto)


# --- sliding_window_logits --------------------------------------------------------------------


@pytest.mark.parametrize("blend", ["constant", "gaussian"])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
@pytest.mark.parametrize("tile", [16, 32, 50, 64])
def test_pointwise_model_tiled_equals_untiled(tile: int, overlap: float, blend: str):
    model = pointwise_model()
    for height, width in [(97, 131), (40, 200), (12, 9)]:  # the last is smaller than any tile
        x = image(height, width)
        untiled = model(x[None])[0]
        for batch_tiles in (1, 3, 8):
            cfg = TilingConfig(
                tile_size_px=tile, overlap=overlap, blend=blend, batch_tiles=batch_tiles
            )
            logits = sliding_window_logits(x, model, cfg)
            assert logits.shape == (5, height, width) and logits.dtype == torch.float32
            # A weighted mean of identical values: equal up to float rounding.
            torch.testing.assert_close(logits, untiled, rtol=1e-5, atol=1e-5)
            assert torch.equal(logits.argmax(0), untiled.argmax(0))


def test_batch_tiles_never_changes_the_result():
    x = image(97, 131)
    for model in (pointwise_model(), one_tile_at_a_time(small_cnn())):
        for blend in ("constant", "gaussian"):
            results = [
                sliding_window_logits(
                    x,
                    model,
                    TilingConfig(tile_size_px=32, overlap=0.25, blend=blend, batch_tiles=b),
                )
                for b in (1, 7)
            ]
            assert torch.equal(results[0], results[1])


def test_tiled_cnn_differs_from_untiled_but_agrees_mostly():
    """The CNN is a meaningful reference: tiling changes its logits near tile borders."""
    model = small_cnn()
    x = image(97, 131)
    untiled = model(x[None])[0]
    tiled = sliding_window_logits(x, model, TilingConfig(tile_size_px=32, overlap=0.25))
    assert not torch.allclose(tiled, untiled, atol=1e-4)
    assert (tiled.argmax(0) == untiled.argmax(0)).float().mean().item() > 0.9


def test_forward_with_wrong_output_size_is_refused():
    x = image(40, 40)
    pooled = lambda t: torch.nn.functional.avg_pool2d(t, 2)  # noqa: E731
    with pytest.raises(ValueError, match=r"\(B, K, h, w\) at the tile's size"):
        sliding_window_logits(x, pooled, TilingConfig(tile_size_px=16))


def test_half_precision_logits_are_blended_in_float32():
    model = pointwise_model()
    x = image(40, 60)
    logits = sliding_window_logits(
        x, lambda t: model(t).to(torch.bfloat16), TilingConfig(tile_size_px=16)
    )
    assert logits.dtype == torch.float32


# --- segment_scene ----------------------------------------------------------------------------


@pytest.mark.parametrize("segment_width_px", [128, 100, 37])
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_segment_scene_equals_whole_image_cnn(segment_width_px: int, blend: str):
    x = image(300, 500)
    model = one_tile_at_a_time(small_cnn())
    cfg = TilingConfig(tile_size_px=64, overlap=0.25, blend=blend, batch_tiles=3)
    expected = sliding_window_logits(x, model, cfg).argmax(0).numpy()
    assert np.array_equal(run_scene(x, model, cfg, segment_width_px), expected)


def test_segment_scene_with_batched_cnn_agrees():
    """A CNN whose logits shift in the last bit with the batch still agrees on the masks."""
    x = image(300, 500)
    model = small_cnn()
    cfg = TilingConfig(tile_size_px=64, overlap=0.25, batch_tiles=4)
    expected = sliding_window_logits(x, model, cfg).argmax(0).numpy()
    for segment_width_px in (128, 100):
        agreement = (run_scene(x, model, cfg, segment_width_px) == expected).mean()
        assert agreement >= 0.9999


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_segment_scene_pointwise_equals_untiled(overlap: float):
    model = pointwise_model()
    for height, width, tile, segment_width_px in [
        (97, 131, 32, 40),
        (40, 200, 50, 64),
        (12, 9, 16, 4),  # smaller than the tile, segments narrower than it
        (300, 500, 64, 128),
    ]:
        x = image(height, width)
        untiled = model(x[None])[0].argmax(0).numpy()
        cfg = TilingConfig(tile_size_px=tile, overlap=overlap, blend="gaussian", batch_tiles=5)
        assert np.array_equal(run_scene(x, model, cfg, segment_width_px), untiled)


def test_segment_scene_memory_does_not_grow_with_the_scene(monkeypatch: pytest.MonkeyPatch):
    """Accumulators, tile requests and blocks are bounded by tile and segment, not the scene.

    ``segment_scene`` makes its accumulators with ``torch.zeros``; recording every such call
    shows their largest size is the same for a scene 10x wider and 4x taller.
    """
    model = pointwise_model()
    cfg = TilingConfig(tile_size_px=32, overlap=0.25, batch_tiles=4)
    segment_width_px = 128
    allocated: list[int] = []
    real_zeros = torch.zeros

    def recording_zeros(*args, **kwargs):
        tensor = real_zeros(*args, **kwargs)
        allocated.append(tensor.numel())
        return tensor

    monkeypatch.setattr(torch, "zeros", recording_zeros)
    peaks = []
    for height, width in [(64, 400), (256, 4000)]:
        allocated.clear()
        reads: list[list[tuple[int, int, int, int]]] = []
        blocks: list[tuple[int, int, int, int]] = []
        run_scene(image(height, width), model, cfg, segment_width_px, reads, blocks)
        peaks.append(max(allocated))
        assert all(1 <= len(r) <= cfg.batch_tiles for r in reads)
        assert all(h == w == 32 for r in reads for _, _, h, w in r)
        assert max(bw for *_, bw in blocks) <= segment_width_px
        assert max(bh for _, _, bh, _ in blocks) <= cfg.tile_size_px
    # numer (K, tile, segment) is the largest buffer: 5 * 32 * 128, whatever the scene.
    assert peaks == [5 * 32 * 128, 5 * 32 * 128]


def test_segment_boundaries_on_tile_starts_cost_one_tile_column_each():
    """Only tiles straddling a segment boundary are computed twice."""
    model = pointwise_model()
    x = image(100, 1000)
    for overlap, extra_per_boundary in [(0.0, 0), (0.25, 1), (0.5, 1)]:
        cfg = TilingConfig(tile_size_px=64, overlap=overlap, batch_tiles=8)
        segments = segment_columns(1000, 64, overlap, 256)
        starts = tile_starts(1000, 64, overlap)
        assert all(c0 in starts for c0, _ in segments)  # aligned to the global grid
        assert all(c1 - c0 <= 256 for c0, c1 in segments)
        reads: list[list[tuple[int, int, int, int]]] = []
        run_scene(x, model, cfg, 256, windows_read=reads)
        n_read = sum(len(r) for r in reads)
        grid = len(tile_windows(100, 1000, 64, overlap))
        rows = len(tile_starts(100, 64, overlap))
        assert n_read == grid + (len(segments) - 1) * extra_per_boundary * rows
