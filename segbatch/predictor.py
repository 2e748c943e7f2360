"""A model plus its preprocessing: uint8 images in, class-index masks out. No Ray here.

The steps equal the notebook's plain loop and torchvision's preset transforms, done in batches on
the device: resize (the preset's antialiased bilinear on the integer image), scale to [0, 1],
normalize, forward, resize logits bilinearly (align_corners=False) to the original size, argmax.
Images of different sizes are never padded together: padding changes every pixel of models with
global pooling (DeepLabV3's ASPP, LRASPP), so a batch is split into groups of one size.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict, deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future
from typing import Any

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from segbatch.config import InferenceConfig, TilingConfig
from segbatch.decode import model_input_size
from segbatch.logits import resize_argmax
from segbatch.models import ModelInfo, build_model
from segbatch.tiling import needs_tiling, sliding_window_logits


def pick_device(requested: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' without a GPU is an error naming the fix."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "inference.device is cuda but this worker sees no CUDA GPU; use --device auto or cpu, "
            "or give the workers GPUs (inference.gpus_per_worker)"
        )
    return torch.device(requested)


def mask_dtype(num_classes: int) -> np.dtype[Any]:
    return np.dtype(np.uint8) if num_classes <= 256 else np.dtype(np.uint16)


class Predictor:
    """Holds one model on one device. ``segment`` turns images into masks.

    Images: ``(H, W, C)`` numpy arrays; ``uint8`` is scaled by 1/255, other dtypes used as is.
    Masks: ``(H, W)`` uint8 (uint16 above 256 classes) at each image's own size.
    """

    def __init__(
        self,
        info: ModelInfo,
        inference: InferenceConfig,
        tiling: TilingConfig,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.info = info
        self.inference = inference
        self.tiling = tiling
        self.device = pick_device(inference.device)
        if inference.threads_per_worker:
            torch.set_num_threads(inference.threads_per_worker)
        self.model = build_model(info, self.device, dict(storage_options or {}))
        if inference.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.mean = torch.tensor(info.mean, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        self.std = torch.tensor(info.std, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        self.out_dtype = mask_dtype(info.num_classes)

    # -- the steps, on tensors ---------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        precision = self.inference.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def prepare(self, batch: np.ndarray, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(N, H, W, C) array of one size and dtype -> (N, C, h, w) normalized float32 on device.

        ``size``: the model's input size; images not already at it (the decode stage resizes
        uint8 images on the CPU) are resized here with the preset's antialiased bilinear.
        """
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2)
        if size is not None and tuple(x.shape[-2:]) != size:
            x = TF.resize(x, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)
        if x.dtype == torch.uint8:
            x = x.to(torch.float32).div(255)
        else:
            x = x.to(torch.float32)
        x = x.sub(self.mean).div(self.std)
        # The HWC array viewed as CHW is channels_last in memory, and torch keeps that layout
        # through the network. fp32 NCHW unless asked: the notebook's ToTensor gives contiguous
        # NCHW, and the same layout runs the same convolution kernels, so the same masks.
        fmt = torch.channels_last if self.inference.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) normalized -> (N, K, h, w) float32 logits."""
        with self._autocast():
            return self.model(x).float()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Whole images or tiles, as the tiling config says: (N, C, h, w) -> (N, K, h, w)."""
        h, w = x.shape[-2:]
        if not needs_tiling(h, w, self.tiling):
            return self.forward(x)
        return torch.stack([sliding_window_logits(xi, self.forward, self.tiling) for xi in x])

    def to_masks(self, logits: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """(N, K, h, w) logits -> N masks of ``sizes[i]``, one at a time to bound memory."""
        out = []
        for i, size in enumerate(sizes):
            classes = resize_argmax(logits[i], (size[0], size[1]))
            out.append(classes.cpu().numpy().astype(self.out_dtype, copy=False))
        return out

    # -- the public entry ---------------------------------------------------------------------
    def segment(
        self,
        images: Sequence[np.ndarray],
        sizes: Sequence[tuple[int, int]] | None = None,
        batch_size: int | None = None,
        pool: Executor | None = None,
    ) -> list[np.ndarray]:
        """Masks for ``images`` (any mix of sizes), in the same order.

        ``sizes``: each image's original (height, width), the size of its mask; by default the
        image's own size. Images may arrive already resized for the model (see decode).
        ``pool``: where to turn logits into masks (resize to the original size, argmax); with a
        thread pool that runs while the next group goes through the model.
        """
        masks: list[np.ndarray | None] = [None] * len(images)
        for i, mask in self.segment_iter(images, sizes, batch_size, pool):
            masks[i] = mask
        return [m for m in masks if m is not None]

    def segment_iter(
        self,
        images: Sequence[np.ndarray],
        sizes: Sequence[tuple[int, int]] | None = None,
        batch_size: int | None = None,
        pool: Executor | None = None,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``segment``, yielding ``(index, mask)`` as soon as each group's masks are made, so
        that the caller can write them while the next group runs."""
        sizes = list(sizes) if sizes is not None else [im.shape[:2] for im in images]
        step = batch_size or len(images) or 1
        pending: deque[tuple[list[int], Future[list[np.ndarray]]]] = deque()
        for idx in _groups(images, sizes, self.info.resize, step):
            batch = np.stack([images[i] for i in idx])
            h, w = sizes[idx[0]]
            with torch.inference_mode():
                logits = self.logits(self.prepare(batch, model_input_size(h, w, self.info.resize)))
            group_sizes = [sizes[i] for i in idx]
            if pool is None:
                yield from zip(idx, self._masks_of(logits, group_sizes), strict=True)
                continue
            pending.append((idx, pool.submit(self._masks_of, logits, group_sizes)))
            while pending and pending[0][1].done():
                done_idx, fut = pending.popleft()
                yield from zip(done_idx, fut.result(), strict=True)
        while pending:
            done_idx, fut = pending.popleft()
            yield from zip(done_idx, fut.result(), strict=True)

    def _masks_of(self, logits: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        with torch.inference_mode():
            return self.to_masks(logits, sizes)


def _groups(
    images: Sequence[np.ndarray],
    sizes: Sequence[tuple[int, int]],
    resize: str | int | tuple[int, int],
    step: int,
) -> Iterator[list[int]]:
    """Indices of images that can share a forward pass, in chunks of at most ``step``: same
    array shape and dtype, and the same model input size."""
    by_key: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for i, img in enumerate(images):
        target = model_input_size(*sizes[i], resize)
        by_key[(img.shape, img.dtype.str, target)].append(i)
    for idx in by_key.values():
        for start in range(0, len(idx), step):
            yield idx[start : start + step]
