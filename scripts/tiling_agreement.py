#!/usr/bin/env python3
"""How much tiled and untiled masks of a real CNN agree on the real samples.

A random-init DeepLabV3-MobileNetV3 whose BatchNorm statistics are calibrated on the sample
photos (so its masks use many classes), run whole and tiled at several tile sizes on the Landsat
scene and the sample photos, through segbatch's Predictor. Prints one line per case.

    .venv/bin/python scripts/tiling_agreement.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segbatch.config import InferenceConfig, ModelConfig, PreprocessConfig, TilingConfig  # noqa: E402
from segbatch.models import resolve_model  # noqa: E402
from segbatch.predictor import Predictor  # noqa: E402
from tests.conftest import PHOTOS, calibrate_batchnorm, photo  # noqa: E402


def main() -> None:
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    torch.manual_seed(0)
    net = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, aux_loss=False)
    calibrate_batchnorm(net, [photo(p.name) for p in sorted(PHOTOS.glob("*.png"))])
    ckpt = Path("/tmp/segbatch-calibrated.pt")
    torch.save(net.state_dict(), ckpt)
    info = resolve_model(
        ModelConfig(name="deeplabv3_mobilenet_v3_large", weights=str(ckpt)),
        PreprocessConfig(resize="none"),
    )
    import rasterio

    with rasterio.open(ROOT / "tests/data/satellite/landsat7_andros_rgb.tif") as src:
        landsat = np.moveaxis(src.read(), 0, -1)
    images = {"landsat 791x718": landsat}
    images.update({f"{p.stem} photo": photo(p.name) for p in sorted(PHOTOS.glob("*.png"))})
    inference = InferenceConfig(device="cpu")
    whole = Predictor(info, inference, TilingConfig(enabled=False))
    for name, image in images.items():
        ref = whole.segment([image])[0]
        used = len(np.unique(ref))
        for tile in (256, 384):
            for blend in ("gaussian", "constant"):
                tiled = Predictor(
                    info, inference, TilingConfig(enabled=True, tile_size_px=tile, blend=blend)
                )
                got = tiled.segment([image])[0]
                agree = float((got == ref).mean())
                case = f"{name:22s} tile {tile} overlap 0.25 {blend:8s}"
                print(f"{case}: {agree:.2%} agree ({used} classes)")


if __name__ == "__main__":
    main()
