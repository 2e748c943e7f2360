"""Predictor: the layout the model sees, masks streamed group by group, the actor's fallback."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segbatch.actor import SegmentActor
from segbatch.config import InferenceConfig, ModelConfig, PreprocessConfig, TilingConfig
from segbatch.models import resolve_model
from segbatch.predictor import Predictor


def predictor(channels_last: bool = False, resize: Any = "none") -> Predictor:
    torch.manual_seed(0)
    info = resolve_model(
        ModelConfig(name="lraspp_mobilenet_v3_large", weights="none"),
        PreprocessConfig(resize=resize),
    )
    inference = InferenceConfig(device="cpu", channels_last=channels_last)
    return Predictor(info, inference, TilingConfig(enabled=False))


def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(40, 56), (33, 48)] * 3]


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_model_sees_the_layout_the_notebook_gives_it(channels_last: bool) -> None:
    """A decoded (H, W, C) image viewed as CHW is channels_last in memory; unless asked for,
    the model gets contiguous NCHW as ToTensor makes it, or its kernels differ in the last bit."""
    p = predictor(channels_last)
    x = p.prepare(images()[0][None])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert x.is_contiguous(memory_format=fmt)
    assert channels_last or x.is_contiguous()


def test_masks_equal_the_reference_loop_in_any_mode() -> None:
    p = predictor()
    ims = images()
    expected = []
    with torch.inference_mode():
        for im in ims:
            x = torch.from_numpy(im).permute(2, 0, 1).float().div(255)[None].contiguous()
            x = (x - p.mean) / p.std
            expected.append(p.model(x)[0].argmax(0).numpy())
    with ThreadPoolExecutor(1) as pool:
        for batch_size, use_pool in [(1, False), (3, False), (2, True)]:
            got = p.segment(ims, batch_size=batch_size, pool=pool if use_pool else None)
            for g, e in zip(got, expected, strict=True):
                assert np.array_equal(g, e)


def test_segment_iter_yields_each_group_as_it_is_done() -> None:
    p = predictor()
    calls = []
    model = p.model
    p.model = lambda x: calls.append(x.shape[0]) or model(x)  # type: ignore[assignment]
    gen = p.segment_iter(images(), batch_size=2)
    first, second = next(gen), next(gen)
    # The first group's two masks come out after one forward pass, not after all of them.
    assert (first[0], second[0], calls) == (0, 2, [2])
    rest = [i for i, _ in gen]
    assert sorted([0, 2, *rest]) == list(range(6))
    assert calls == [2, 1, 2, 1]


def test_resized_logits_for_the_original_size() -> None:
    p = predictor(resize=64)
    im = images()[1]  # 33 x 48: the model sees 64 x 93
    (mask,) = p.segment([im])
    assert mask.shape == (33, 48)
    x = p.prepare(im[None], (64, 93))
    with torch.inference_mode():
        logits = p.model(x)
    expected = F.interpolate(logits, size=(33, 48), mode="bilinear", align_corners=False)
    assert np.array_equal(mask, expected[0].argmax(0).numpy())


class FlakyPredictor:
    """segment_iter yields image 0, then fails; image 2 fails alone as well."""

    def segment_iter(self, images, sizes, batch_size, pool):
        yield 0, np.zeros((2, 2), np.uint8)
        raise RuntimeError("CUDA out of memory")

    def segment(self, images, sizes, batch_size):
        if images[0][0, 0, 0] == 2:
            raise ValueError("bad size")
        return [np.full((2, 2), images[0][0, 0, 0], np.uint8)]


def test_a_failed_group_is_retried_image_by_image_without_redoing_the_done_ones() -> None:
    actor = object.__new__(SegmentActor)
    actor.predictor = FlakyPredictor()  # type: ignore[assignment]
    actor.batch_size = 4
    actor.post_pool = None
    ims = [np.full((2, 2, 3), i, np.uint8) for i in range(4)]
    results = dict(actor._segment(ims, [(2, 2)] * 4))
    assert sorted(results) == [0, 1, 2, 3]
    assert int(results[0][0, 0]) == 0  # from the group, not redone
    assert int(results[1][0, 0]) == 1 and int(results[3][0, 0]) == 3
    assert isinstance(results[2], ValueError)
