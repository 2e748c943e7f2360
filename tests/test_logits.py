"""segbatch.logits equals the plain ``F.interpolate(...).argmax(0)`` exactly: ties, NaN, sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segbatch.logits import argmax_classes, index_dtype, resize_argmax


def reference(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(logits.shape[1:]) != size:
        logits = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
    return logits.argmax(0)


def smooth_logits(k: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Logits with regions and boundaries, as a segmentation head makes them."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, k, h // 8 + 2, w // 8 + 2, generator=g) * 4
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ((520, 693), (480, 640)),  # the preset's downsize back to a VGA photo
        ((520, 520), (1000, 750)),  # upsampling, different factors per axis
        ((37, 53), (37, 53)),  # no resize
        ((64, 48), (65, 47)),  # off by one
        ((1, 1), (5, 3)),  # degenerate
    ],
)
@pytest.mark.parametrize("classes", [1, 2, 21])
def test_resize_argmax_equals_interpolate_then_argmax(src, dst, classes) -> None:
    logits = smooth_logits(classes, *src)
    got = resize_argmax(logits, dst)
    assert got.dtype == torch.uint8
    assert got.shape == dst
    assert torch.equal(got.long(), reference(logits, dst))


def test_each_plane_resizes_bit_for_bit_as_the_whole_tensor() -> None:
    """What makes the per-plane resize exact: the values, not only their argmax, are equal."""
    logits = torch.randn(1, 21, 520, 693)
    whole = F.interpolate(logits, size=(480, 640), mode="bilinear", align_corners=False)
    for k in range(21):
        plane = F.interpolate(logits[:, k : k + 1], size=(480, 640), mode="bilinear")
        assert torch.equal(plane[0, 0], whole[0, k])


def test_ties_go_to_the_first_class() -> None:
    logits = torch.zeros(5, 4, 4)
    logits[2, :2] = 1.0
    logits[4, :2] = 1.0  # tied with class 2 on the top half
    logits[3, 3, 3] = float("inf")
    logits[1, 3, 3] = float("inf")
    got = argmax_classes(logits)
    assert torch.equal(got.long(), logits.argmax(0))
    assert got[0, 0] == 2 and got[3, 3] == 1 and got[2, 0] == 0


def test_nan_logits_give_what_argmax_gives() -> None:
    logits = smooth_logits(6, 40, 40)
    logits[3, 5, 7] = float("nan")
    logits[0, 20:, 20:] = float("nan")
    assert torch.equal(argmax_classes(logits).long(), logits.argmax(0))
    assert torch.equal(resize_argmax(logits, (50, 30)).long(), reference(logits, (50, 30)))


def test_more_than_256_classes() -> None:
    logits = smooth_logits(300, 24, 24, seed=3)
    got = resize_argmax(logits, (30, 30))
    assert got.dtype == index_dtype(300) == torch.int32
    assert torch.equal(got.long(), reference(logits, (30, 30)))
    assert int(got.max()) > 255


@pytest.mark.parametrize("size", [(480, 640), (520, 693)])
def test_channels_last_logits_give_what_torch_gives_for_them(size) -> None:
    """With inference.channels_last the model's logits arrive channels_last; the answer is the
    plain call's on that same tensor (torch's channels_last kernels)."""
    logits = smooth_logits(21, 520, 693, seed=1)[None].contiguous(memory_format=torch.channels_last)
    got = resize_argmax(logits[0], size)
    expected = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0].argmax(0)
    assert torch.equal(got.long(), expected)


def test_argmax_of_a_view_needs_no_copy() -> None:
    """A streamed scene hands over the first rows of its accumulator, a strided view."""
    buffer = smooth_logits(7, 64, 48, seed=2)
    view = buffer[:, :20]
    assert not view.is_contiguous()
    assert torch.equal(argmax_classes(view).long(), view.argmax(0))
