"""The core promise: segbatch's masks equal the notebook's plain loop.

Same weights (a calibrated random-init checkpoint whose masks use many classes), CPU, fp32,
batch sizes 1 and 4, images of mixed sizes, through the whole Ray pipeline.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms
from torchvision.models.segmentation import DeepLabV3_MobileNet_V3_Large_Weights

from segbatch.config import load_job
from segbatch.pipeline import run_job
from tests.conftest import IMAGENET_MEAN, IMAGENET_STD, PHOTOS

pytestmark = pytest.mark.usefixtures("ray_session")

# torch threads of each inference actor, and of the reference loop. CPU convolutions are bitwise
# reproducible at one thread count, not across counts: oneDNN splits its reductions by thread on
# some processors (on an AMD EPYC, a 512x512 photo's logits differ by 5e-10 between 1 and 2
# threads, and 2 pixels in 808,606 flip at near-ties). The notebook's loop run with the actors'
# thread count is the reference every pixel must equal.
ACTOR_THREADS = 1


@pytest.fixture(scope="module")
def mixed_sizes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three sample photos plus two odd-sized crops: five sizes, some shared."""
    root = tmp_path_factory.mktemp("mixed")
    for p in sorted(PHOTOS.glob("*.png")):
        shutil.copy(p, root / p.name)
    cat = Image.open(PHOTOS / "chelsea_cat.png").convert("RGB")
    cat.crop((10, 20, 343, 277)).save(root / "cat_crop_a.png")
    cat.crop((40, 0, 373, 257)).save(root / "cat_crop_b.png")  # same size as crop a
    return root


def plain_loop(model: torch.nn.Module, path: Path) -> np.ndarray:
    """The notebook: Image.open -> ToTensor -> Normalize -> model(x)["out"][0].argmax(0)."""
    tf = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )
    x = tf(Image.open(path).convert("RGB"))
    with torch.inference_mode():
        return model(x[None])["out"][0].argmax(0).numpy()


def preset_loop(model: torch.nn.Module, path: Path) -> np.ndarray:
    """torchvision's preset transform, then logits resized bilinearly to the original size."""
    preset = DeepLabV3_MobileNet_V3_Large_Weights.DEFAULT.transforms()
    im = Image.open(path).convert("RGB")
    x = preset(im)
    with torch.inference_mode():
        logits = model(x[None])["out"]
        logits = F.interpolate(
            logits, size=(im.height, im.width), mode="bilinear", align_corners=False
        )
        return logits[0].argmax(0).numpy()


def run(tmp_path: Path, images: Path, ckpt: dict[str, Any], resize: str, batch_size: int) -> Path:
    out = tmp_path / f"out-{resize}-{batch_size}"
    job = load_job(
        None,
        {
            "input.paths": [str(images)],
            "output.path": str(out),
            "output.overlays": 0,
            "model.name": ckpt["name"],
            "model.weights": ckpt["path"],
            "preprocess.resize": resize,
            "inference.device": "cpu",
            "inference.batch_size": batch_size,
            "inference.threads_per_worker": ACTOR_THREADS,
        },
    )
    assert run_job(job) == 0
    return out


@pytest.mark.parametrize(
    ("resize", "batch_size"), [("none", 1), ("none", 4), ("auto", 1), ("auto", 4)]
)
def test_masks_equal_the_plain_loop(
    tmp_path: Path,
    mixed_sizes: Path,
    calibrated_checkpoint: dict[str, Any],
    resize: str,
    batch_size: int,
) -> None:
    model = calibrated_checkpoint["model"]
    out = run(tmp_path, mixed_sizes, calibrated_checkpoint, resize, batch_size)
    reference = plain_loop if resize == "none" else preset_loop
    equal = total = 0
    classes_used: set[int] = set()
    threads = torch.get_num_threads()
    torch.set_num_threads(ACTOR_THREADS)
    try:
        expected_masks = {p: reference(model, p) for p in sorted(mixed_sizes.glob("*.png"))}
    finally:
        torch.set_num_threads(threads)
    for path, expected in expected_masks.items():
        got = np.asarray(Image.open(out / "masks" / path.name))
        assert got.shape == expected.shape
        equal += int((got == expected).sum())
        total += expected.size
        values, counts = np.unique(expected, return_counts=True)
        classes_used |= {
            int(v) for v, c in zip(values, counts, strict=True) if c > 0.01 * expected.size
        }
    agreement = equal / total
    print(f"resize={resize} batch_size={batch_size}: {agreement:.6%} of {total} pixels agree")
    # A model predicting one class everywhere would pass any comparison: make sure it does not.
    assert len(classes_used) >= 5, classes_used
    assert agreement == 1.0  # every pixel: the same kernels on the same numbers
