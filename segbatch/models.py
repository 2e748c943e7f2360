"""The model registry: torchvision segmentation models, a built-in U-Net and user models.

Each registry entry owns its preprocessing and class names, as torchvision's ``Weights(transforms,
meta)`` do. :func:`resolve_model` runs on the driver: it reads those presets, applies the job's
overrides and returns a small, picklable :class:`ModelInfo` without downloading anything or
importing user code. :func:`build_model` runs where the model is used (a Ray actor): it builds the
network, loads its weights and wraps it so that ``(N, C, H, W)`` float32 normalized input gives
``(N, K, H, W)`` logits at the input's own size.

Weights are one of ``default`` (the entry's pretrained weights), ``none`` (random initialisation,
for dry runs), a torchvision weights enum name, or a checkpoint URI read through fsspec. Pickled
code is never run: checkpoints are loaded with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import pickle
import sys
import urllib.parse
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeAlias

import fsspec
import torch
import torch.nn.functional as F
from torch import nn

from segbatch import io
from segbatch.config import ModelConfig, PreprocessConfig
from segbatch.errors import (
    CheckpointNotFoundError,
    ConfigError,
    UnknownModelError,
    UserModelError,
    WeightsError,
    closest,
)

Resize: TypeAlias = Literal["none"] | int | tuple[int, int]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

TORCHVISION_MODELS: tuple[str, ...] = (
    "deeplabv3_mobilenet_v3_large",
    "deeplabv3_resnet101",
    "deeplabv3_resnet50",
    "fcn_resnet101",
    "fcn_resnet50",
    "lraspp_mobilenet_v3_large",
)
UNET = "unet"
# Used when the U-Net is configured with neither model.classes nor model.num_classes.
UNET_DEFAULT_NUM_CLASSES = 2

# Keys a training script commonly nests the state_dict under.
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net")
# Prefixes added by DistributedDataParallel / DataParallel and by torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# torchvision's auxiliary training head; segbatch builds models with aux_loss off.
_AUX_PREFIX = "aux_classifier."
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".pth.tar", ".bin", ".ckpt", ".tar")


@dataclass(frozen=True)
class ModelInfo:
    """Everything needed to build a model and preprocess its input; resolved on the driver.

    ``mean`` and ``std`` are per channel, in units of the scaled input (uint8 scaled to [0, 1]).
    ``resize`` is ``"none"``, an int (the shorter side, as torchvision's ``Resize(int)``) or
    ``(h, w)``. ``pad_to_multiple`` is applied by the wrapper :func:`build_model` returns.
    """

    name: str
    weights: str
    classes: tuple[str, ...]
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: Resize
    pad_to_multiple: int
    code_path: str | None = None
    unet_depth: int = 4
    unet_base_channels: int = 32

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def is_user_model(self) -> bool:
        return ":" in self.name


# --------------------------------------------------------------------------------------------
# The built-in U-Net
# --------------------------------------------------------------------------------------------


class DoubleConv(nn.Sequential):
    """(3x3 conv, BatchNorm, ReLU) twice: ``(N, C_in, H, W) -> (N, C_out, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """U-Net (Ronneberger et al., 2015) with same-padded convolutions.

    ``depth`` 2x2 max-pool steps down, a bottleneck, then ``depth`` transposed-conv steps up,
    each concatenated with the encoder output of the same scale (skip connection). Level ``i``
    has ``base_channels * 2**i`` channels.

    ``(N, in_channels, H, W) float32 -> (N, num_classes, H, W)`` logits, for H and W multiples of
    ``2**depth`` (the wrapper from :func:`build_model` pads to that).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = UNET_DEFAULT_NUM_CLASSES,
        depth: int = 4,
        base_channels: int = 32,
    ) -> None:
        super().__init__()
        if depth < 1 or base_channels < 1 or in_channels < 1 or num_classes < 1:
            raise ConfigError(
                "unet needs depth, base_channels, in_channels and num_classes of at least 1; "
                f"got {depth}, {base_channels}, {in_channels}, {num_classes}"
            )
        self.depth = depth
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.encoder = nn.ModuleList()
        channels = in_channels
        for width in widths[:-1]:
            self.encoder.append(DoubleConv(channels, width))
            channels = width
        self.pool = nn.MaxPool2d(kernel_size=2)
        self.bottleneck = DoubleConv(widths[-2], widths[-1])
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in reversed(range(depth)):
            self.up.append(
                nn.ConvTranspose2d(widths[level + 1], widths[level], kernel_size=2, stride=2)
            )
            self.decoder.append(DoubleConv(2 * widths[level], widths[level]))
        self.head = nn.Conv2d(widths[0], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        multiple = 2**self.depth
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(
                f"UNet of depth {self.depth} needs H and W that are multiples of {multiple}, "
                f"got {tuple(x.shape[-2:])}; set preprocess.pad_to_multiple to {multiple}"
            )
        skips: list[torch.Tensor] = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, block, skip in zip(self.up, self.decoder, reversed(skips), strict=True):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)


# --------------------------------------------------------------------------------------------
# The wrapper every built model is returned in
# --------------------------------------------------------------------------------------------


def _logits_of(output: Any) -> torch.Tensor:
    """The logits tensor out of a tensor, a dict with ``"out"`` or a tuple/list (first item)."""
    if isinstance(output, Mapping):
        if "out" not in output:
            raise TypeError(
                f"the model returned a dict without an 'out' entry (keys: {sorted(output)}); "
                "return the logits tensor, {'out': logits} or (logits, ...)"
            )
        output = output["out"]
    elif isinstance(output, tuple | list):
        if not output:
            raise TypeError("the model returned an empty tuple; its first item must be the logits")
        output = output[0]
    if not isinstance(output, torch.Tensor) or output.ndim != 4:
        what = (
            f"a tensor of shape {tuple(output.shape)}"
            if isinstance(output, torch.Tensor)
            else type(output).__name__
        )
        raise TypeError(f"the model must return (N, K, H, W) logits, got {what}")
    return output


class SegmentationModel(nn.Module):
    """A segmentation network behind one calling convention.

    ``(N, C, H, W) float32`` normalized input -> ``(N, K, H, W)`` logits at the same H, W.
    The input is zero-padded at the bottom and right up to multiples of ``pad_to_multiple``;
    logits of another size than the padded input are resized bilinearly (``align_corners=False``)
    to it; then the padding is cropped off. The wrapped network is ``.net``.
    """

    def __init__(self, net: nn.Module, pad_to_multiple: int = 1) -> None:
        super().__init__()
        if pad_to_multiple < 1:
            raise ConfigError(f"pad_to_multiple must be at least 1, got {pad_to_multiple}")
        self.net = net
        self.pad_to_multiple = pad_to_multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected an (N, C, H, W) batch, got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        pad_h = -height % self.pad_to_multiple
        pad_w = -width % self.pad_to_multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        logits = _logits_of(self.net(x))
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(
                logits, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False
            )
        return logits[..., :height, :width]


# --------------------------------------------------------------------------------------------
# The registry: presets read from torchvision's Weights without downloading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Preset:
    """What a registry entry owns: input conventions, class names and default weights."""

    resize: Resize
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] | None  # None: set by the job (model.classes / num_classes)
    default_weights: str | None  # torchvision enum member name; None: no pretrained weights


def _weights_enum(name: str) -> Any:
    """The torchvision weights enum class of a registry model (e.g. LRASPP_..._Weights)."""
    from torchvision.models import get_model_weights

    return get_model_weights(name)


@cache
def _preset(name: str) -> _Preset:
    if name == UNET:
        return _Preset("none", IMAGENET_MEAN, IMAGENET_STD, None, None)
    default = _weights_enum(name).DEFAULT
    transforms = default.transforms()
    resize_size = list(transforms.resize_size) if transforms.resize_size is not None else None
    resize: Resize
    if not resize_size:
        resize = "none"
    elif len(resize_size) == 1:
        resize = int(resize_size[0])
    else:
        resize = (int(resize_size[0]), int(resize_size[1]))
    return _Preset(
        resize=resize,
        mean=tuple(float(v) for v in transforms.mean),
        std=tuple(float(v) for v in transforms.std),
        classes=tuple(default.meta["categories"]),
        default_weights=default.name,
    )


def voc_categories() -> tuple[str, ...]:
    """The 21 Pascal VOC class names of torchvision's pretrained segmentation weights."""
    classes = _preset("lraspp_mobilenet_v3_large").classes
    assert classes is not None
    return classes


def model_names() -> list[str]:
    """Every registry name, sorted (user models ``module:callable`` are not listed)."""
    return sorted((*TORCHVISION_MODELS, UNET))


def _unknown_model(name: str) -> UnknownModelError:
    return UnknownModelError(
        f"unknown model {name!r}{closest(name, model_names())}; known: "
        f"{', '.join(model_names())}; or a user model as module:callable with model.code_path"
    )


def _format_floats(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _format_resize(resize: Resize) -> str:
    if isinstance(resize, int):
        return str(resize)
    if isinstance(resize, tuple):
        return f"{resize[0]}x{resize[1]}"
    return resize


def _format_norm(mean: tuple[float, ...], std: tuple[float, ...]) -> str:
    if (mean, std) == (IMAGENET_MEAN, IMAGENET_STD):
        return "ImageNet"
    return f"{_format_floats(mean)} / {_format_floats(std)}"


def describe_models() -> str:
    """A text table of the registry for ``segbatch models``: classes, weights, input conventions."""
    header = ("name", "classes", "default weights", "resize", "pad to", "mean / std", "channels")
    rows: list[tuple[str, ...]] = [header]
    for name in model_names():
        preset = _preset(name)
        norm = _format_norm(preset.mean, preset.std)
        if name == UNET:
            classes = f"model.num_classes / model.classes (default {UNET_DEFAULT_NUM_CLASSES})"
            weights = "none: pass a checkpoint"
            norm += " (3 channels), else 0 / 1"
            pad, channels = "2**depth", "any"
        else:
            assert preset.classes is not None
            classes = f"{len(preset.classes)}: {', '.join(preset.classes[:3])}, ..."
            weights = str(preset.default_weights)
            pad, channels = "1", "3"
        rows.append((name, classes, weights, _format_resize(preset.resize), pad, norm, channels))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [
        "",
        f"ImageNet mean / std: {_format_floats(IMAGENET_MEAN)} / {_format_floats(IMAGENET_STD)}"
        " on inputs scaled to [0, 1]; resize 520 = the shorter side.",
        "User models: model.name module:callable with model.code_path (a directory or .py file)"
        " and model.num_classes or model.classes; resize none, ImageNet (3 channels) else 0 / 1,"
        " pad to 1.",
        "Weights: default | none | a torchvision weights name | a checkpoint URI (path, file://,"
        " s3://, ...). Override with preprocess.resize, preprocess.mean / std and"
        " preprocess.pad_to_multiple.",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Resolving the job's model section on the driver
# --------------------------------------------------------------------------------------------

_WeightsKind = Literal["none", "default", "enum", "checkpoint"]


def _looks_like_path(weights: str) -> bool:
    return (
        "://" in weights
        or "/" in weights
        or os.sep in weights
        or weights.lower().endswith(_CHECKPOINT_SUFFIXES)
        or os.path.exists(weights)
    )


def weights_kind(name: str, weights: str) -> _WeightsKind:
    """'none', 'default', 'enum' (a torchvision weights name) or 'checkpoint' (a URI)."""
    return _weights_kind(name, weights)


def _weights_kind(name: str, weights: str) -> _WeightsKind:
    if weights == "none":
        return "none"
    if weights == "default":
        return "default"
    if name in TORCHVISION_MODELS and not _looks_like_path(weights):
        return "enum"
    return "checkpoint"


def _weights_member(name: str, weights: str) -> Any:
    """The torchvision weights enum member for ``default`` or an enum name (with or without the
    class prefix), or a WeightsError listing the valid names."""
    enum = _weights_enum(name)
    if weights == "default":
        return enum.DEFAULT
    member_name = weights
    if "." in weights:
        prefix, _, member_name = weights.rpartition(".")
        if prefix != enum.__name__:
            member_name = ""
    members = {member.name: member for member in enum}
    if member_name in members:
        return members[member_name]
    valid = ["default", *members, *(f"{enum.__name__}.{m}" for m in members)]
    raise WeightsError(
        f"unknown weights {weights!r} for model {name!r}; valid: {', '.join(valid)}; "
        "or a checkpoint path / URI, or none"
    )


def _local_path(uri: str) -> str | None:
    """The local file a URI names (plain path or file://), or None for remote URIs."""
    if uri.startswith("file://"):
        return urllib.parse.unquote(urllib.parse.urlparse(uri).path)
    if "://" in uri:
        return None
    return os.path.expanduser(uri)


def _resolve_resize(pre: PreprocessConfig, preset: Resize) -> Resize:
    resize = pre.resize
    if resize == "auto":
        return preset
    if resize == "none":
        return "none"
    if isinstance(resize, list):  # a config built in code rather than parsed from YAML
        resize = tuple(resize)
    if isinstance(resize, bool) or not isinstance(resize, int | tuple):
        raise ConfigError(f"preprocess.resize: {resize!r}; use auto, none, an int or [h, w]")
    if isinstance(resize, int):
        if resize < 8:
            raise ConfigError("preprocess.resize must be at least 8 pixels")
        return resize
    if len(resize) != 2 or any(not isinstance(v, int) or v < 8 for v in resize):
        raise ConfigError(f"preprocess.resize: {resize!r}; [h, w] needs two sizes of 8 or more")
    return (int(resize[0]), int(resize[1]))


def _resolve_norm(
    pre: PreprocessConfig, in_channels: int, preset: _Preset
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if in_channels == 3:
        mean, std = preset.mean, preset.std
    else:
        mean, std = (0.0,) * in_channels, (1.0,) * in_channels
    for key, override in (("mean", pre.mean), ("std", pre.std)):
        if override is not None and len(override) != in_channels:
            raise ConfigError(
                f"preprocess.{key} has {len(override)} values but the model takes {in_channels} "
                f"input channels; give one value per channel"
            )
    if pre.std is not None and any(s <= 0 for s in pre.std):
        raise ConfigError("preprocess.std values must be above 0")
    mean = tuple(float(v) for v in pre.mean) if pre.mean is not None else mean
    std = tuple(float(v) for v in pre.std) if pre.std is not None else std
    return mean, std


def _numbered_classes(num_classes: int) -> tuple[str, ...]:
    return tuple(f"class_{i}" for i in range(num_classes))


def _configured_classes(model: ModelConfig) -> tuple[str, ...] | None:
    """Class names set by model.classes / model.num_classes, or None when neither is set."""
    if model.classes is not None:
        if model.num_classes is not None and model.num_classes != len(model.classes):
            raise ConfigError(
                f"model.classes names {len(model.classes)} classes but model.num_classes is "
                f"{model.num_classes}"
            )
        if not model.classes:
            raise ConfigError("model.classes is empty; name at least one class")
        return tuple(model.classes)
    if model.num_classes is not None:
        if model.num_classes < 1:
            raise ConfigError("model.num_classes must be at least 1")
        return _numbered_classes(model.num_classes)
    return None


def _torchvision_classes(model: ModelConfig, kind: _WeightsKind) -> tuple[str, ...]:
    configured = _configured_classes(model)
    if kind in ("default", "enum"):
        member = _weights_member(model.name, model.weights)
        categories = tuple(member.meta["categories"])
        if configured is not None and len(configured) != len(categories):
            raise WeightsError(
                f"the {model.name} weights {type(member).__name__}.{member.name} predict "
                f"{len(categories)} classes but the job sets {len(configured)} "
                "(model.classes / model.num_classes); for another class count pass a checkpoint "
                "trained for it (--weights PATH) or --weights none"
            )
        # Names the job gives (same count) rename the classes; otherwise the weights' own.
        return tuple(model.classes) if model.classes is not None else categories
    # A checkpoint of the pretrained model keeps its VOC names when nothing else is said.
    return configured if configured is not None else voc_categories()


def resolve_model(model: ModelConfig, pre: PreprocessConfig) -> ModelInfo:
    """The model and its input conventions, from the job's ``model`` and ``preprocess`` sections.

    Runs on the driver before any Ray work: reads the registry presets, applies the overrides and
    checks them. Downloads nothing and never imports user code.
    """
    name = model.name
    is_user = ":" in name
    if not is_user and name not in TORCHVISION_MODELS and name != UNET:
        raise _unknown_model(name)
    if is_user:
        module, _, attr = name.partition(":")
        if not module or not attr:
            raise UnknownModelError(f"user model {name!r} must be written module:callable")
        if model.code_path is None:
            raise ConfigError(
                f"model.name {name!r} is a user model: set model.code_path to the directory or "
                ".py file holding its module"
            )
    kind = _weights_kind(name, model.weights)
    if kind == "checkpoint":
        local = _local_path(model.weights)
        if local is not None and not os.path.exists(local):
            raise CheckpointNotFoundError(
                f"weights checkpoint {model.weights!r} does not exist; pass an existing file, "
                "a torchvision weights name, default or none"
            )
    if kind == "default" and name == UNET:
        raise WeightsError(
            "unet has no pretrained weights: pass --weights PATH to a checkpoint you trained, "
            "or --weights none for a dry run with random weights"
        )

    preset = _preset(UNET) if is_user else _preset(name)
    if name in TORCHVISION_MODELS:
        if model.in_channels not in (None, 3):
            raise ConfigError(
                f"{name} takes 3 input channels (RGB), not model.in_channels={model.in_channels}; "
                "use model.name unet (any in_channels) or a user model for other band counts"
            )
        in_channels = 3
        classes = _torchvision_classes(model, kind)
        pad_default = 1
    else:
        in_channels = model.in_channels if model.in_channels is not None else 3
        if in_channels < 1:
            raise ConfigError("model.in_channels must be at least 1")
        configured = _configured_classes(model)
        if configured is None:
            if is_user:
                raise ConfigError(
                    f"user model {name!r}: set model.num_classes or model.classes (segbatch "
                    "cannot know how many classes it predicts without importing it)"
                )
            configured = _numbered_classes(UNET_DEFAULT_NUM_CLASSES)
        classes = configured
        if name == UNET:
            if model.unet.depth < 1 or model.unet.base_channels < 1:
                raise ConfigError("model.unet.depth and model.unet.base_channels must be >= 1")
            pad_default = 2**model.unet.depth
        else:
            pad_default = 1

    mean, std = _resolve_norm(pre, in_channels, preset)
    if pre.pad_to_multiple is not None and pre.pad_to_multiple < 1:
        raise ConfigError("preprocess.pad_to_multiple must be at least 1")
    return ModelInfo(
        name=name,
        weights=model.weights,
        classes=classes,
        in_channels=in_channels,
        mean=mean,
        std=std,
        resize=_resolve_resize(pre, preset.resize),
        pad_to_multiple=pre.pad_to_multiple if pre.pad_to_multiple is not None else pad_default,
        code_path=model.code_path,
        unet_depth=model.unet.depth,
        unet_base_channels=model.unet.base_channels,
    )


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def _unwrap_state_dict(obj: Any, uri: str) -> dict[str, torch.Tensor]:
    """The flat tensor state_dict out of what ``torch.load`` returned."""
    if isinstance(obj, nn.Module):  # not reachable with weights_only=True; kept for clarity
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            nested = obj.get(key)
            if isinstance(nested, Mapping):
                obj = nested
                break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(
            f"checkpoint {uri!r} holds no state_dict (a mapping of parameter names to tensors, "
            f"bare or under one of {', '.join(_STATE_DICT_KEYS)})"
        )
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsError(
            f"checkpoint {uri!r}: entries that are not tensors ({', '.join(not_tensors[:5])}); "
            f"save model.state_dict(), bare or under one of {', '.join(_STATE_DICT_KEYS)}"
        )
    state: dict[str, torch.Tensor] = {}
    for key, tensor in obj.items():
        key = str(key)
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix) :]
                    stripped = True
        if key.startswith(_AUX_PREFIX):
            continue
        state[key] = tensor
    return state


def _is_torch_file(handle: Any) -> bool:
    """Whether an open file is in a format ``torch.save`` writes: a zip archive holding a
    ``data.pkl`` (torch >= 1.6), or a legacy pickle (its first byte is the protocol opcode 0x80).
    """
    handle.seek(0)
    head = handle.read(4)
    if head[:1] == b"\x80":
        return True
    if head != b"PK\x03\x04":
        return False
    handle.seek(0)
    try:
        with zipfile.ZipFile(handle) as archive:
            return any(name.rsplit("/", 1)[-1] == "data.pkl" for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


def _torch_load_weights(handle: Any, uri: str) -> Any:
    """``torch.load`` with ``weights_only=True``, its failures turned into WeightsError.

    ``handle``: a seekable binary file; ``uri``: the checkpoint's name in messages (redacted).
    """
    try:
        return torch.load(handle, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # torch reports any file it cannot unpickle as "Weights only load failed", a text file
        # as much as a checkpoint holding code: only the file's own format tells them apart.
        if not _is_torch_file(handle):
            raise WeightsError(
                f"checkpoint {uri!r} is not a PyTorch checkpoint (a .pt/.pth file saved with "
                "torch.save); pass one, a torchvision weights name, default or none"
            ) from exc
        if isinstance(exc, pickle.UnpicklingError) and "weights only" in str(exc).lower():
            raise WeightsError(
                f"checkpoint {uri!r} holds more than weights (pickled Python objects) and cannot "
                "be loaded with weights_only=True: segbatch only loads weights, never pickled "
                "code. Re-save it as torch.save(model.state_dict(), path)"
                f" (detail: {detail})"
            ) from exc
        raise WeightsError(
            f"checkpoint {uri!r} is not a readable PyTorch checkpoint (a torch.save file): {detail}"
        ) from exc


def load_checkpoint(
    uri: str, storage_options: dict[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """A state_dict ``{name: tensor}`` from a checkpoint URI (path, file://, s3://, ...).

    Loaded on the CPU with ``weights_only=True`` (pickled code is refused). Accepts a bare
    state_dict or one nested under ``state_dict``, ``model_state_dict``, ``model`` or ``net``;
    strips ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes and drops
    ``aux_classifier.`` keys. Messages name the URI redacted (no user:password@, no query).
    """
    shown = io.redact(uri)
    with _open_checkpoint(uri, storage_options) as handle:
        obj = _torch_load_weights(handle, shown)
    return _unwrap_state_dict(obj, shown)


@contextlib.contextmanager
def _open_checkpoint(uri: str, storage_options: Mapping[str, Any] | None) -> Iterator[Any]:
    """The checkpoint opened for reading (binary); a missing or unreadable one becomes a
    WeightsError naming the URI redacted (no user:password@, no query)."""
    shown = io.redact(uri)
    try:
        with fsspec.open(uri, "rb", **dict(storage_options or {})) as handle:
            yield handle
    except WeightsError:
        raise
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(
            f"weights checkpoint {shown!r} does not exist; pass an existing file, "
            "a torchvision weights name, default or none"
        ) from exc
    except (OSError, ValueError, ImportError) as exc:
        raise WeightsError(
            f"cannot read weights checkpoint {shown!r}: {io.redact_text(str(exc))}"
        ) from exc


def _classifier_mismatch(
    net: nn.Module, state: Mapping[str, torch.Tensor], num_classes: int
) -> tuple[str, int] | None:
    """(key, checkpoint class count) when a shape mismatch is in the class dimension."""
    own = net.state_dict()
    for key, tensor in state.items():
        mine = own.get(key)
        if mine is None or mine.shape == tensor.shape or mine.ndim == 0:
            continue
        if (
            mine.shape[0] == num_classes
            and mine.shape[1:] == tensor.shape[1:]
            and key.endswith(("weight", "bias"))
        ):
            return key, int(tensor.shape[0])
    return None


def _load_state(
    net: nn.Module, state: Mapping[str, torch.Tensor], info: ModelInfo, source: str
) -> None:
    """Load ``state`` into ``net`` strictly, with errors that say what to change."""
    mismatch = _classifier_mismatch(net, state, info.num_classes)
    if mismatch is not None:
        key, count = mismatch
        raise WeightsError(
            f"the weights {source} have {count} classes ({key} has shape "
            f"{tuple(state[key].shape)}) but {info.name} is configured for {info.num_classes}; "
            f"set model.num_classes: {count} or model.classes to {count} names"
        )
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:4])})")
        if wrong_shape:
            shapes = ", ".join(
                f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong_shape[:3]
            )
            parts.append(f"{len(wrong_shape)} of another shape ({shapes})")
        raise WeightsError(
            f"the weights {source} do not fit {info.name} "
            f"(in_channels={info.in_channels}, num_classes={info.num_classes}): "
            + "; ".join(parts)
            + ". Check model.name, model.in_channels and model.unet settings against the "
            "checkpoint's model"
        )
    net.load_state_dict(state, strict=True)


def _download_state_dict(weights: Any) -> dict[str, torch.Tensor]:
    """torchvision's own download (torch.hub cache, hash checked)."""
    return weights.get_state_dict(progress=False, check_hash=True)


def fetch_pretrained(info: ModelInfo) -> None:
    """Download torchvision weights (``default`` or an enum name) into torch hub's cache now,
    with the same clear error as at build time when offline."""
    _pretrained_state(info.name, _weights_member(info.name, info.weights))


# Bytes read per step when hashing a checkpoint: memory stays flat whatever its size.
_HASH_CHUNK_BYTES = 8 << 20


def weights_id(info: ModelInfo, storage_options: Mapping[str, Any] | None = None) -> str:
    """What the weights are, independent of how they were spelled; --resume compares it.

    A checkpoint: ``'sha256:<hex>'`` of its bytes, streamed through fsspec (one read, on the
    driver). torchvision weights: the enum's full name, e.g.
    ``'LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1'`` (``default`` resolved).
    ``'none'`` for random initialisation; a user model's other value as written.
    """
    import hashlib

    kind = _weights_kind(info.name, info.weights)
    if kind == "none":
        return "none"
    if kind in ("default", "enum"):
        if info.name not in TORCHVISION_MODELS:
            return info.weights
        member = _weights_member(info.name, info.weights)
        return f"{type(member).__name__}.{member.name}"
    digest = hashlib.sha256()
    with _open_checkpoint(info.weights, storage_options) as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def _pretrained_state(name: str, weights: Any) -> dict[str, torch.Tensor]:
    url: str = weights.url
    file_name = os.path.basename(urllib.parse.urlparse(url).path)
    cache_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    label = f"{type(weights).__name__}.{weights.name}"
    try:
        state = _download_state_dict(weights)
    except (OSError, TimeoutError) as exc:  # URLError, socket timeouts and HTTPError included
        raise WeightsError(
            f"cannot download the {name} weights {label} ({type(exc).__name__}: {exc}). "
            f"The file {file_name} comes from {url} and torch hub caches it in {cache_dir} "
            "(under $TORCH_HOME/hub/checkpoints when TORCH_HOME is set): copy it there by hand "
            "on machines without internet access, or pass --weights PATH for a local checkpoint, "
            "or --weights none for a dry run with random weights"
        ) from exc
    except RuntimeError as exc:  # a bad hash or a truncated cached file
        raise WeightsError(
            f"the {name} weights {label} from {url} did not load ({exc}); delete "
            f"{os.path.join(cache_dir, file_name)} and retry, or pass --weights PATH / none"
        ) from exc
    return {k: v for k, v in state.items() if not k.startswith(_AUX_PREFIX)}


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def _import_user_module(module_name: str, code_path: str) -> Any:
    path = Path(code_path).expanduser()
    if not path.exists():
        raise UserModelError(
            f"model.code_path {code_path!r} does not exist; it must be the directory or .py file "
            f"holding the module {module_name!r}"
        )
    try:
        if path.is_dir():
            root = str(path.resolve())
            if root not in sys.path:
                sys.path.insert(0, root)
            return importlib.import_module(module_name)
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"{code_path!r} is not an importable Python file")
        module = importlib.util.module_from_spec(spec)
        # Registered before running it, as import does, so its classes pickle by reference.
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(module_name, None)
            raise
        return module
    except Exception as exc:
        raise UserModelError(
            f"cannot import the user model module {module_name!r} from model.code_path "
            f"{code_path!r}: {type(exc).__name__}: {exc}"
        ) from exc


def _build_user_net(info: ModelInfo) -> nn.Module:
    module_name, _, attr_path = info.name.partition(":")
    if info.code_path is None:
        raise ConfigError(f"user model {info.name!r} needs model.code_path")
    module = _import_user_module(module_name, info.code_path)
    target: Any = module
    for attr in attr_path.split("."):
        if not hasattr(target, attr):
            raise UserModelError(
                f"module {module_name!r} (from {info.code_path!r}) has no {attr_path!r}"
                f"{closest(attr, dir(module))}"
            )
        target = getattr(target, attr)
    if not callable(target):
        raise UserModelError(f"{info.name!r} is not callable")
    factory: Callable[..., Any] = target
    offered = {"num_classes": info.num_classes, "in_channels": info.in_channels}
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        kwargs: dict[str, int] = {}
    else:
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            kwargs = offered
        else:
            accepted = {
                p.name
                for p in parameters
                if p.kind
                in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            }
            kwargs = {k: v for k, v in offered.items() if k in accepted}
    net = factory(**kwargs)
    if not isinstance(net, nn.Module):
        raise UserModelError(
            f"user model {info.name!r} returned {type(net).__name__}, not a torch.nn.Module"
        )
    return net


def _build_torchvision_net(info: ModelInfo) -> nn.Module:
    from torchvision.models import get_model_builder

    builder = get_model_builder(info.name)
    kwargs: dict[str, Any] = {
        "weights": None,
        "weights_backbone": None,
        "num_classes": info.num_classes,
    }
    if "aux_loss" in inspect.signature(builder).parameters:
        kwargs["aux_loss"] = False
    return builder(**kwargs)


def build_net(info: ModelInfo) -> nn.Module:
    """The bare network for ``info`` on the CPU, randomly initialised (no weights loaded)."""
    if info.is_user_model:
        return _build_user_net(info)
    if info.name == UNET:
        return UNet(info.in_channels, info.num_classes, info.unet_depth, info.unet_base_channels)
    if info.name in TORCHVISION_MODELS:
        return _build_torchvision_net(info)
    raise _unknown_model(info.name)


def parameter_count(info: ModelInfo) -> int | None:
    """How many parameters the network has, counted without allocating them (meta device);
    None when the network cannot be built that way (a user model that insists on real tensors).
    """
    try:
        with torch.device("meta"):
            net = build_net(info)
    except Exception:
        return None
    return sum(p.numel() for p in net.parameters())


def build_model(
    info: ModelInfo,
    device: torch.device | str = "cpu",
    storage_options: dict[str, Any] | None = None,
) -> SegmentationModel:
    """The model ready for inference: weights loaded, eval mode, on ``device``.

    Returns a :class:`SegmentationModel`: ``(N, C, H, W) float32`` normalized input ->
    ``(N, K, H, W)`` logits at the input's H, W (the network is ``.net``). Pretrained weights
    are downloaded into torch hub's cache; checkpoints are read through fsspec with
    ``storage_options``.
    """
    net = build_net(info)
    kind = _weights_kind(info.name, info.weights)
    if kind == "checkpoint":
        state = load_checkpoint(info.weights, storage_options)
        _load_state(net, state, info, f"in {io.redact(info.weights)!r}")
    elif kind in ("default", "enum") and info.name in TORCHVISION_MODELS:
        member = _weights_member(info.name, info.weights)
        state = _pretrained_state(info.name, member)
        _load_state(net, state, info, f"{type(member).__name__}.{member.name}")
    elif kind in ("default", "enum") and info.name == UNET:
        raise WeightsError(
            "unet has no pretrained weights: pass --weights PATH to a checkpoint you trained, "
            "or --weights none for a dry run with random weights"
        )
    # none: random initialisation; a user model's default: whatever its callable returned.
    model = SegmentationModel(net, info.pad_to_multiple)
    return model.to(torch.device(device)).eval()
