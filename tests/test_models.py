"""Tests for segbatch.models: the registry, the U-Net, user models and weights loading."""

from __future__ import annotations

import pickle
import sys
import urllib.error
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segbatch.config import ModelConfig, PreprocessConfig, UNetConfig
from segbatch.errors import (
    CheckpointNotFoundError,
    ConfigError,
    UnknownModelError,
    UserModelError,
    WeightsError,
)
from segbatch.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelInfo,
    SegmentationModel,
    UNet,
    build_model,
    describe_models,
    load_checkpoint,
    model_names,
    resolve_model,
)

PRE = PreprocessConfig()
TORCHVISION = [
    "deeplabv3_mobilenet_v3_large",
    "deeplabv3_resnet101",
    "deeplabv3_resnet50",
    "fcn_resnet101",
    "fcn_resnet50",
    "lraspp_mobilenet_v3_large",
]
SLOW_RESNET101 = {"deeplabv3_resnet101", "fcn_resnet101"}


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def resolve(pre: PreprocessConfig = PRE, **model: Any) -> ModelInfo:
    return resolve_model(ModelConfig(**model), pre)


def batch(n: int, c: int, h: int, w: int) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(1))


USER_MODEL_PY = """
import torch
import torch.nn.functional as F
from torch import nn


class Pointwise(nn.Module):
    def __init__(self, in_channels, num_classes, output="tensor"):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        self.output = output

    def forward(self, x):
        y = self.conv(x)
        if self.output == "dict":
            return {"out": y, "aux": y * 0}
        if self.output == "tuple":
            return (y, None)
        if self.output == "half":
            return F.avg_pool2d(y, 2)
        return y


def tensor_model(num_classes, in_channels):
    return Pointwise(in_channels, num_classes)


def dict_model(num_classes, in_channels=3):
    return Pointwise(in_channels, num_classes, "dict")


def tuple_model(*, num_classes, in_channels):
    return Pointwise(in_channels, num_classes, "tuple")


def half_model(num_classes, **kwargs):
    return Pointwise(kwargs["in_channels"], num_classes, "half")


def fixed_model():
    return Pointwise(3, 2)


def not_a_module(num_classes):
    return "not a module"
"""


@pytest.fixture()
def user_py(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "my_seg_models.py"
    path.write_text(USER_MODEL_PY)
    yield path
    sys.modules.pop("my_seg_models", None)


# ---------------------------------------------------------------- registry and presets


def test_model_names_sorted_and_complete() -> None:
    assert model_names() == sorted([*TORCHVISION, "unet"])


def test_describe_models_lists_every_model_with_conventions() -> None:
    text = describe_models()
    for name in model_names():
        assert name in text
    assert "21: __background__, aeroplane" in text
    assert "COCO_WITH_VOC_LABELS_V1" in text
    assert "520" in text
    assert "0.485, 0.456, 0.406" in text


def test_lraspp_preset_from_torchvision_weights() -> None:
    info = resolve(name="lraspp_mobilenet_v3_large")
    assert info.resize == 520
    assert info.mean == pytest.approx(IMAGENET_MEAN)
    assert info.std == pytest.approx(IMAGENET_STD)
    assert info.num_classes == 21
    assert info.classes[0] == "__background__"
    assert info.classes[1] == "aeroplane"
    assert info.classes[-1] == "tvmonitor"
    assert info.in_channels == 3
    assert info.pad_to_multiple == 1
    assert info.weights == "default"
    assert info.code_path is None


@pytest.mark.parametrize("name", TORCHVISION)
def test_every_torchvision_preset_is_voc_at_520(name: str) -> None:
    info = resolve(name=name, weights="COCO_WITH_VOC_LABELS_V1")
    assert (info.resize, info.num_classes, info.classes[15]) == (520, 21, "person")


def test_unet_preset_and_overrides() -> None:
    info = resolve(name="unet", weights="none", unet=UNetConfig(depth=3, base_channels=8))
    assert info.resize == "none"
    assert info.pad_to_multiple == 8
    assert info.classes == ("class_0", "class_1")
    assert info.mean == IMAGENET_MEAN
    four = resolve(name="unet", weights="none", in_channels=4, num_classes=5)
    assert four.mean == (0.0,) * 4
    assert four.std == (1.0,) * 4
    assert four.classes == tuple(f"class_{i}" for i in range(5))
    named = resolve(name="unet", weights="none", classes=("water", "land", "cloud"))
    assert named.num_classes == 3
    assert named.classes == ("water", "land", "cloud")


def test_preprocess_overrides() -> None:
    pre = PreprocessConfig(resize=(256, 320), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    info = resolve(pre, name="deeplabv3_resnet50")
    assert info.resize == (256, 320)
    assert info.mean == (0.5, 0.5, 0.5)
    assert info.std == (0.25, 0.25, 0.25)
    assert resolve(PreprocessConfig(resize="none"), name="fcn_resnet50").resize == "none"
    assert resolve(PreprocessConfig(resize=384), name="fcn_resnet50").resize == 384
    as_list = PreprocessConfig(resize=[300, 400])  # type: ignore[arg-type]
    assert resolve(as_list, name="fcn_resnet50").resize == (300, 400)
    with pytest.raises(ConfigError, match="resize"):
        resolve(PreprocessConfig(resize=(4, 400)), name="fcn_resnet50")
    padded = resolve(PreprocessConfig(pad_to_multiple=32), name="lraspp_mobilenet_v3_large")
    assert padded.pad_to_multiple == 32


def test_mean_length_must_match_channels() -> None:
    with pytest.raises(ConfigError, match=r"preprocess.mean has 3 values .* 4 input channels"):
        resolve(
            PreprocessConfig(mean=(0.1, 0.2, 0.3)),
            name="unet",
            weights="none",
            in_channels=4,
        )


def test_unknown_model_names_closest_and_known() -> None:
    with pytest.raises(UnknownModelError) as excinfo:
        resolve(name="deeplabv3_resnet5")
    message = str(excinfo.value)
    assert "did you mean 'deeplabv3_resnet50'" in message
    assert "lraspp_mobilenet_v3_large" in message and "unet" in message


def test_torchvision_models_need_three_channels() -> None:
    with pytest.raises(ConfigError, match="unet"):
        resolve(name="fcn_resnet50", in_channels=4)


def test_pretrained_weights_fix_the_class_count() -> None:
    with pytest.raises(WeightsError, match="21 classes"):
        resolve(name="lraspp_mobilenet_v3_large", num_classes=5)
    # Names for the same count rename the classes.
    names = tuple(f"c{i}" for i in range(21))
    assert resolve(name="lraspp_mobilenet_v3_large", classes=names).classes == names
    # Without pretrained weights any count is fine.
    assert resolve(name="lraspp_mobilenet_v3_large", weights="none", num_classes=5).classes == (
        "class_0",
        "class_1",
        "class_2",
        "class_3",
        "class_4",
    )


def test_weights_none_or_checkpoint_keep_voc_names(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"")
    for weights in ("none", str(ckpt)):
        info = resolve(name="deeplabv3_mobilenet_v3_large", weights=weights)
        assert info.num_classes == 21
        assert info.classes[0] == "__background__"


def test_weights_enum_names() -> None:
    long = "DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1"
    assert resolve(name="deeplabv3_resnet50", weights=long).weights == long
    with pytest.raises(WeightsError, match="valid: default, COCO_WITH_VOC_LABELS_V1"):
        resolve(name="deeplabv3_resnet50", weights="IMAGENET1K_V2")
    with pytest.raises(WeightsError, match="valid"):
        resolve(name="deeplabv3_resnet50", weights="FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1")


def test_missing_checkpoint_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(CheckpointNotFoundError, match=r"nope.pth"):
        resolve(name="unet", weights=str(missing))
    with pytest.raises(FileNotFoundError, match=r"nope.pth"):
        load_checkpoint(f"file://{missing}")


def test_unet_default_weights_say_what_to_do() -> None:
    with pytest.raises(WeightsError, match="--weights none"):
        resolve(name="unet")


def test_user_model_needs_class_count(user_py: Path) -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        resolve(name="my_seg_models:tensor_model", code_path=str(user_py))


def test_resolve_never_imports_user_code(tmp_path: Path) -> None:
    (tmp_path / "exploding_model.py").write_text("raise RuntimeError('imported!')\n")
    info = resolve(
        name="exploding_model:build",
        code_path=str(tmp_path / "exploding_model.py"),
        num_classes=3,
    )
    assert "exploding_model" not in sys.modules
    assert info.resize == "none" and info.pad_to_multiple == 1 and info.num_classes == 3
    assert pickle.loads(pickle.dumps(info)) == info
    with pytest.raises(UserModelError, match=r"exploding_model.*imported!"):
        build_model(info)


# ---------------------------------------------------------------- building


@pytest.mark.parametrize("name", TORCHVISION)
def test_every_torchvision_model_gives_logits_at_input_size(name: str) -> None:
    info = resolve(name=name, weights="none", num_classes=4)
    model = build_model(info)
    assert isinstance(model, SegmentationModel)
    assert not model.training and not model.net.training
    assert not hasattr(model.net, "aux_classifier") or model.net.aux_classifier is None
    size = (64, 64) if name in SLOW_RESNET101 else (67, 93)
    with torch.inference_mode():
        logits = model(batch(1, 3, *size))
    assert logits.shape == (1, 4, *size)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert logits.std() > 0


@pytest.mark.parametrize(
    ("depth", "base", "in_channels", "size"),
    [(1, 4, 1, (5, 7)), (2, 8, 3, (67, 93)), (4, 4, 5, (33, 17))],
)
def test_unet_any_size_through_padding(
    depth: int, base: int, in_channels: int, size: tuple[int, int]
) -> None:
    info = resolve(
        name="unet",
        weights="none",
        in_channels=in_channels,
        num_classes=3,
        unet=UNetConfig(depth=depth, base_channels=base),
    )
    model = build_model(info)
    assert isinstance(model.net, UNet)
    assert model.pad_to_multiple == 2**depth
    assert model.net.head.out_channels == 3
    assert model.net.encoder[0][0].in_channels == in_channels
    assert model.net.bottleneck[0].out_channels == base * 2**depth
    with torch.inference_mode():
        logits = model(batch(2, in_channels, *size))
    assert logits.shape == (2, 3, *size)
    # The wrapper's padding is exactly zero padding followed by a crop.
    x = batch(2, in_channels, *size)
    pad_h, pad_w = -size[0] % 2**depth, -size[1] % 2**depth
    with torch.inference_mode():
        expected = model.net(F.pad(x, (0, pad_w, 0, pad_h)))[..., : size[0], : size[1]]
        assert torch.equal(model(x), expected)


def test_unet_refuses_sizes_it_cannot_pool() -> None:
    net = UNet(3, 2, depth=3, base_channels=4).eval()
    with pytest.raises(ValueError, match="multiples of 8"):
        net(torch.zeros(1, 3, 20, 24))
    assert net(torch.zeros(1, 3, 16, 24)).shape == (1, 2, 16, 24)


@pytest.mark.parametrize("factory", ["tensor_model", "dict_model", "tuple_model"])
def test_user_model_output_forms(user_py: Path, factory: str) -> None:
    info = resolve(name=f"my_seg_models:{factory}", code_path=str(user_py), num_classes=4)
    model = build_model(info)
    x = batch(2, 3, 67, 93)
    with torch.inference_mode():
        logits = model(x)
        expected = model.net.conv(x)
    assert logits.shape == (2, 4, 67, 93)
    assert torch.equal(logits, expected)


def test_user_model_smaller_output_is_resized_bilinearly(user_py: Path) -> None:
    info = resolve(
        name="my_seg_models:half_model", code_path=str(user_py), in_channels=2, num_classes=3
    )
    model = build_model(info)
    x = batch(1, 2, 67, 93)
    with torch.inference_mode():
        raw = model.net(x)
        logits = model(x)
    assert raw.shape == (1, 3, 33, 46)
    expected = F.interpolate(raw, size=(67, 93), mode="bilinear", align_corners=False)
    assert torch.equal(logits, expected)


def test_user_model_from_directory_and_signature(tmp_path: Path) -> None:
    pkg = tmp_path / "code" / "segpkg_for_test"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(USER_MODEL_PY)
    try:
        info = resolve(
            name="segpkg_for_test.nets:fixed_model",
            code_path=str(tmp_path / "code"),
            num_classes=2,
        )
        model = build_model(info)
        assert model.net.conv.out_channels == 2
        bad = resolve(
            name="segpkg_for_test.nets:not_a_module",
            code_path=str(tmp_path / "code"),
            num_classes=2,
        )
        with pytest.raises(UserModelError, match=r"not a torch.nn.Module"):
            build_model(bad)
        missing = resolve(
            name="segpkg_for_test.nets:tensor_modle",
            code_path=str(tmp_path / "code"),
            num_classes=2,
        )
        with pytest.raises(UserModelError, match="did you mean 'tensor_model'"):
            build_model(missing)
    finally:
        for name in ("segpkg_for_test", "segpkg_for_test.nets"):
            sys.modules.pop(name, None)


def test_user_module_not_found_names_code_path(tmp_path: Path) -> None:
    info = resolve(name="no_such_module_xyz:build", code_path=str(tmp_path), num_classes=2)
    with pytest.raises(UserModelError, match=f"no_such_module_xyz.*{tmp_path.name}"):
        build_model(info)


def test_wrapper_rejects_bad_outputs() -> None:
    class Bad(nn.Module):
        def forward(self, x: torch.Tensor) -> Any:
            return {"logits": x}

    with pytest.raises(TypeError, match="'out'"):
        SegmentationModel(Bad())(torch.zeros(1, 3, 4, 4))


# ---------------------------------------------------------------- checkpoints


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def test_checkpoint_round_trip_nested_and_ddp_prefix(tmp_path: Path) -> None:
    info = resolve(name="lraspp_mobilenet_v3_large", weights="none", num_classes=3)
    original = build_model(info)
    x = batch(1, 3, 67, 93)
    reference = _outputs(original, x)
    state = original.net.state_dict()
    bare = tmp_path / "bare.pth"
    torch.save(state, bare)
    nested = tmp_path / "nested.pt"
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 7},
        nested,
    )
    for uri in (str(bare), f"file://{nested}"):
        loaded_info = resolve(name="lraspp_mobilenet_v3_large", weights=uri, num_classes=3)
        loaded = build_model(loaded_info)
        assert torch.equal(_outputs(loaded, x), reference)
    # Another random initialisation differs, so the equality above is the checkpoint's doing.
    torch.manual_seed(1)
    fresh = build_model(resolve(name="lraspp_mobilenet_v3_large", weights="none", num_classes=3))
    assert not torch.equal(_outputs(fresh, x), reference)


def test_checkpoint_ignores_aux_classifier(tmp_path: Path) -> None:
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    net = deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=2, aux_loss=True
    ).eval()
    assert any(k.startswith("aux_classifier.") for k in net.state_dict())
    path = tmp_path / "deeplab.pt"
    torch.save({"model": net.state_dict()}, path)
    state = load_checkpoint(str(path))
    assert not any(k.startswith("aux_classifier.") for k in state)
    assert set(state) == {k for k in net.state_dict() if not k.startswith("aux_classifier.")}
    info = resolve(name="deeplabv3_mobilenet_v3_large", weights=str(path), num_classes=2)
    model = build_model(info)
    x = batch(1, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(model(x), net(x)["out"])


def test_checkpoint_class_count_mismatch(tmp_path: Path) -> None:
    trained = build_model(resolve(name="unet", weights="none", num_classes=5))
    path = tmp_path / "unet5.pt"
    torch.save(trained.net.state_dict(), path)
    with pytest.raises(WeightsError, match=r"have 5 classes .* model.num_classes: 5"):
        build_model(resolve(name="unet", weights=str(path), num_classes=3))
    loaded = build_model(resolve(name="unet", weights=str(path), num_classes=5))
    x = batch(1, 3, 20, 20)
    assert torch.equal(_outputs(loaded, x), _outputs(trained, x))


def test_checkpoint_of_another_architecture(tmp_path: Path) -> None:
    other = UNet(3, 2, depth=2, base_channels=4)
    path = tmp_path / "shallow.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(WeightsError, match="missing"):
        build_model(resolve(name="unet", weights=str(path), unet=UNetConfig(depth=3)))


class NotAWeight:
    def __init__(self) -> None:
        self.lr = 0.1


def test_checkpoint_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    state = UNet(3, 2, depth=1, base_channels=2).state_dict()
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": state, "optimizer_config": NotAWeight()}, path)
    with pytest.raises(WeightsError, match="only loads weights"):
        load_checkpoint(str(path))


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError, match=r"junk.pt"):
        load_checkpoint(str(path))


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("notes.txt", b"these are my notes, not weights\n"),
        ("empty.pt", b""),
        ("images.zip", None),  # a zip archive, but not one torch.save wrote
    ],
)
def test_a_file_that_is_no_checkpoint_is_named_so(tmp_path: Path, name: str, data: bytes) -> None:
    path = tmp_path / name
    if data is None:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("a.png", b"not really a png")
    else:
        path.write_bytes(data)
    with pytest.raises(WeightsError) as info:
        load_checkpoint(str(path))
    message = str(info.value)
    assert "not a PyTorch checkpoint (a .pt/.pth file saved with torch.save)" in message
    assert name in message
    assert "pickled Python objects" not in message


def test_legacy_checkpoint_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    torch.save({"cfg": NotAWeight()}, path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:1] == b"\x80"
    with pytest.raises(WeightsError, match="pickled Python objects"):
        load_checkpoint(str(path))


def test_checkpoint_error_redacts_the_uri(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"plain text")
    with pytest.raises(WeightsError) as info:
        load_checkpoint(f"file://{path}?token=Pa55w0rd")
    assert "Pa55w0rd" not in str(info.value)


# ---------------------------------------------------------------- pretrained weights


def test_default_weights_offline_names_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(url: str, dst: str, *args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    info = resolve(name="lraspp_mobilenet_v3_large")
    with pytest.raises(WeightsError) as excinfo:
        build_model(info)
    message = str(excinfo.value)
    assert "--weights PATH" in message and "--weights none" in message
    assert "lraspp_mobilenet_v3_large-d234d4ea.pth" in message
    assert "https://download.pytorch.org/models/lraspp_mobilenet_v3_large-d234d4ea.pth" in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in message


def test_default_weights_from_torch_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_download(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the cached file must be used")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    pretrained = deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=21, aux_loss=True
    ).eval()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(pretrained.state_dict(), cache / "deeplabv3_mobilenet_v3_large-fc3c493d.pth")
    info = resolve(name="deeplabv3_mobilenet_v3_large")
    model = build_model(info)
    assert model.net.aux_classifier is None
    x = batch(1, 3, 45, 61)
    with torch.inference_mode():
        assert torch.equal(model(x), pretrained(x)["out"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_saved_checkpoint_loads_on_cpu_and_builds_on_cuda(tmp_path: Path) -> None:
    trained = UNet(3, 2, depth=2, base_channels=4).cuda()
    path = tmp_path / "gpu.pt"
    torch.save(trained.state_dict(), path)
    info = resolve(name="unet", weights=str(path), unet=UNetConfig(depth=2, base_channels=4))
    on_cpu = build_model(info, "cpu")
    assert all(p.device.type == "cpu" for p in on_cpu.parameters())
    on_gpu = build_model(info, "cuda")
    x = batch(1, 3, 21, 30)
    with torch.inference_mode():
        torch.testing.assert_close(on_gpu(x.cuda()).cpu(), on_cpu(x), rtol=1e-4, atol=1e-4)
