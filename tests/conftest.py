"""Shared fixtures: one local Ray per test session, the sample photos, a calibrated model."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "jobs" / "samples" / "photos"
DATA = Path(__file__).resolve().parent / "data"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def memfs() -> Iterator[Any]:
    """fsspec's in-memory filesystem, emptied before and after the test."""
    import fsspec

    fs = fsspec.filesystem("memory")

    def clear() -> None:
        fs.store.clear()
        fs.pseudo_dirs.clear()
        fs.pseudo_dirs.append("")

    clear()
    yield fs
    clear()


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for the whole session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


def photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8 sample photo."""
    return np.asarray(Image.open(PHOTOS / name).convert("RGB"))


def calibrate_batchnorm(model: torch.nn.Module, images: list[np.ndarray], seed: int = 0) -> None:
    """Give a random-init model real BatchNorm statistics so its masks use many classes.

    Train mode, one no-grad pass over 256x256 crops of real photos, cumulative averages.
    """
    for mod in model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.momentum = None
            mod.reset_running_stats()
    rng = np.random.default_rng(seed)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    crops = []
    for im in images:
        for _ in range(4):
            y = int(rng.integers(0, im.shape[0] - 256))
            x = int(rng.integers(0, im.shape[1] - 256))
            crop = torch.from_numpy(im[y : y + 256, x : x + 256].copy()).permute(2, 0, 1)
            crops.append((crop.float() / 255 - mean) / std)
    model.train()
    with torch.no_grad():
        model(torch.stack(crops))
    model.eval()


@pytest.fixture(scope="session")
def calibrated_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A deeplabv3_mobilenet_v3_large checkpoint (21 classes) whose masks use many classes."""
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    torch.manual_seed(0)
    model = deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=21, aux_loss=False
    )
    calibrate_batchnorm(model, [photo(p.name) for p in sorted(PHOTOS.glob("*.png"))])
    path = tmp_path_factory.mktemp("ckpt") / "deeplab_mnv3_calibrated.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return {"path": str(path), "model": model, "name": "deeplabv3_mobilenet_v3_large"}
