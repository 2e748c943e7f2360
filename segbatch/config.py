"""The job configuration: one typed, frozen tree, built once on the driver.

A job file (YAML) is merged with command-line overrides (``--set dotted.key=value`` and the
named flags), checked key by key against the dataclasses below, and frozen. Library code takes the
sub-config it needs (``cfg.model``, ``cfg.tiling``); nothing reads raw dictionaries after this.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from segbatch import io
from segbatch.errors import ConfigError, UnknownKeyError, closest

# The largest mask value: masks are uint16 above 256 classes.
MAX_MASK_VALUE = 65535

ResizeSpec = Union[str, int, tuple[int, int]]  # noqa: UP007 - read at run time by the parser


@dataclass(frozen=True)
class InputConfig:
    paths: tuple[str, ...] = ()
    # auto: by extension (.tar shards, .parquet shards with image bytes, or image files).
    format: Literal["auto", "files", "tar", "parquet"] = "auto"
    image_column: str = "image"
    path_column: str = "path"
    # Above this many pixels an image is not decoded whole (Pillow's own limit by default).
    max_image_pixels: int = 89_478_485
    # NIfTI: the axis slices are taken along (None: the through-plane axis, the last spatial one).
    slice_axis: int | None = None
    # NIfTI 4-D: which volume along the 4th axis, or "all".
    volume_index: int | Literal["all"] = 0
    # A symlink found in a listed folder (or glob) whose target is outside it is an error row
    # unless this is true: listing a folder should not read files the folder does not hold.
    follow_symlinks: bool = False


@dataclass(frozen=True)
class OutputConfig:
    path: str = "out"
    overwrite: bool = False
    resume: bool = False
    # Three-panel overlays (image, mask, overlay) for the first N inputs.
    overlays: int = 4
    rows_per_file: int = 10_000
    # A results part still filling is rewritten with its rows so far at least this often, so a
    # killed driver loses this much work at most (--resume redoes it).
    flush_every_s: float = 30.0
    mask_write_threads: int = 4
    # Mask value of nodata pixels; never counted as a class.
    nodata_value: int = 255


@dataclass(frozen=True)
class UNetConfig:
    depth: int = 4
    base_channels: int = 32


@dataclass(frozen=True)
class ModelConfig:
    name: str = "lraspp_mobilenet_v3_large"
    # default | none | a torchvision weights enum name | a checkpoint URI
    weights: str = "default"
    # What the weights are, recorded by the run in OUT/job.yaml and compared by --resume:
    # 'sha256:<hex>' of a checkpoint's bytes, the torchvision weights enum's full name, or 'none'.
    # None: computed by the run; a value given must match the weights (the run checks it).
    weights_id: str | None = None
    classes: tuple[str, ...] | None = None
    num_classes: int | None = None
    in_channels: int | None = None
    # Directory or .py file holding a user model named module:callable.
    code_path: str | None = None
    unet: UNetConfig = field(default_factory=UNetConfig)


@dataclass(frozen=True)
class PreprocessConfig:
    # auto: the model's preset; none: the image's own size; an int: the shorter side; [h, w].
    resize: ResizeSpec = "auto"
    pad_to_multiple: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # 1-based band numbers, as GIS tools count.
    bands: tuple[int, ...] | None = None
    nodata: float | None = None
    # none | percentile: stretch each band between these percentiles, per scene.
    stretch: Literal["none", "percentile"] = "none"
    stretch_percentiles: tuple[float, float] = (2.0, 98.0)
    # Intensity window for medical images: a preset name (ct_lung, ...) or {center, width}.
    window: str | dict[str, float] | None = None


@dataclass(frozen=True)
class InferenceConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int | None = None  # None: chosen per device
    # Actor pool size: N, or [min, max] for an autoscaling pool. None: chosen per device.
    workers: int | tuple[int, int] | None = None
    gpus_per_worker: float = 1.0
    cpus_per_worker: float | None = None
    # torch threads per actor. None: all the node's cores over the actors on CPU, 2 on GPU.
    threads_per_worker: int | None = None
    # Threads turning logits into masks (resize to the original size, argmax) while the next
    # batch runs through the model. None: 1 on GPU, and on CPU 1 only when the actors' torch
    # threads leave a core free (a busy core slows every torch parallel region); else 0.
    post_threads: int | None = None
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    channels_last: bool = False
    # Extra Ray resources per actor, e.g. {worker_node: 1}: actors only go to nodes offering them.
    resources: dict[str, float] = field(default_factory=dict)
    # An input whose segmenting stopped its worker this many times (out of memory, a crash in
    # native code) becomes an error row instead of being tried again.
    max_input_attempts: int = 3


@dataclass(frozen=True)
class TilingConfig:
    enabled: Literal["auto"] | bool = "auto"
    tile_size_px: int = 1024
    overlap: float = 0.25
    blend: Literal["gaussian", "constant"] = "gaussian"
    batch_tiles: int = 8
    # GeoTIFFs above this many pixels are not decoded whole: the actor reads them by windows,
    # blends tiles column segment by column segment and writes the mask as it is produced.
    stream_above_px: int = 4096 * 4096
    segment_width_px: int = 4096


@dataclass(frozen=True)
class StorageConfig:
    # Passed to fsspec for every URI (endpoint, profile, anon, ...). Never logged.
    options: dict[str, Any] = field(default_factory=dict)
    retries: int = 5


@dataclass(frozen=True)
class StatsConfig:
    count_components: tuple[str, ...] = ()
    min_component_px: int = 1


@dataclass(frozen=True)
class RayConfig:
    # None: start a local Ray; "auto" or "ray://host:port": attach to a cluster.
    address: str | None = None
    progress_bars: bool | None = None  # None: only on a terminal


@dataclass(frozen=True)
class JobConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    # Above this fraction of error rows the job exits 1 (and stops early once it is clear).
    max_error_fraction: float = 0.5


def all_keys(cls: type = JobConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the tree, leaves and sections."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(all_keys(hints[f.name], key + "."))
    return keys


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the type ``tp`` and convert lists to tuples."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of keys, got {value!r}")
        return _build(tp, value, key + ".")  # type: ignore[arg-type]
    if origin in (Union, types.UnionType):
        errors = []
        for option in get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} is not valid here ({'; or '.join(errors)})")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null")
    if origin is Literal:
        if value in get_args(tp) and type(value) in {type(a) for a in get_args(tp)}:
            return value
        choices = ", ".join(repr(a) for a in get_args(tp))
        raise ConfigError(f"{key}: {value!r} is not one of {choices}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected a list of {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected a whole number, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"no coercion for {tp}")  # a bug in this module, not in the job file


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        if name not in names:
            key = prefix + str(name)
            raise UnknownKeyError(f"unknown key {key!r}{closest(key, all_keys())}")
        kwargs[name] = _coerce(value, hints[name], prefix + name)
    return cls(**kwargs)


def _check(cfg: JobConfig) -> None:
    """Cross-field checks the types cannot express."""
    problems = []
    inf, til = cfg.inference, cfg.tiling
    inp, out = cfg.input, cfg.output
    if inp.max_image_pixels < 1:
        problems.append("input.max_image_pixels must be at least 1 (Pillow's default: 89478485)")
    if inp.slice_axis is not None and inp.slice_axis not in (0, 1, 2):
        problems.append("input.slice_axis must be 0, 1 or 2 (a spatial axis), or null for 2")
    if isinstance(inp.volume_index, int) and inp.volume_index < 0:
        problems.append("input.volume_index must be 0 or more (the first volume is 0), or 'all'")
    if out.mask_write_threads < 1:
        problems.append("output.mask_write_threads must be at least 1")
    if not 0 <= out.nodata_value <= MAX_MASK_VALUE:
        problems.append(
            f"output.nodata_value must be from 0 to {MAX_MASK_VALUE} (masks are uint8 or uint16)"
        )
    model = cfg.model
    if model.num_classes is not None and model.num_classes < 1:
        problems.append("model.num_classes must be at least 1")
    if model.in_channels is not None and model.in_channels < 1:
        problems.append("model.in_channels must be at least 1")
    if model.unet.depth < 1:
        problems.append("model.unet.depth must be at least 1")
    if model.unet.base_channels < 1:
        problems.append("model.unet.base_channels must be at least 1")
    if inf.cpus_per_worker is not None and not inf.cpus_per_worker > 0:
        problems.append("inference.cpus_per_worker must be above 0 (or unset: per device)")
    if til.stream_above_px < 1:
        problems.append("tiling.stream_above_px must be at least 1 (pixels)")
    if til.segment_width_px < til.tile_size_px:
        # Narrower segments give the same masks but compute every tile several times.
        problems.append(
            f"tiling.segment_width_px ({til.segment_width_px}) must be at least "
            f"tiling.tile_size_px ({til.tile_size_px})"
        )
    if cfg.storage.retries < 0:
        problems.append("storage.retries must be 0 or more (0: no retries)")
    if cfg.stats.min_component_px < 1:
        problems.append("stats.min_component_px must be at least 1 (pixels)")
    lo, hi = cfg.preprocess.stretch_percentiles
    if not 0 <= lo < hi <= 100:
        problems.append("preprocess.stretch_percentiles [lo, hi] needs 0 <= lo < hi <= 100")
    if inf.batch_size is not None and inf.batch_size < 1:
        problems.append("inference.batch_size must be at least 1")
    if inf.threads_per_worker is not None and inf.threads_per_worker < 1:
        problems.append("inference.threads_per_worker must be at least 1 (or unset: per device)")
    if inf.post_threads is not None and inf.post_threads < 0:
        problems.append("inference.post_threads must be 0 or more (0: masks made in turn)")
    if inf.max_input_attempts < 1:
        problems.append("inference.max_input_attempts must be at least 1")
    workers = inf.workers
    if isinstance(workers, int) and workers < 1:
        problems.append("inference.workers must be at least 1")
    if isinstance(workers, tuple) and not 1 <= workers[0] <= workers[1]:
        problems.append("inference.workers [min, max] needs 1 <= min <= max")
    if any(not isinstance(v, int | float) or v <= 0 for v in inf.resources.values()):
        problems.append("inference.resources values must be numbers above 0, e.g. {worker_node: 1}")
    if not inf.gpus_per_worker > 0:
        problems.append(
            "inference.gpus_per_worker must be above 0 (fractions such as 0.5 share a GPU)"
        )
    if not 0 <= til.overlap < 1:
        problems.append("tiling.overlap is a fraction of the tile, from 0 up to (not including) 1")
    if til.tile_size_px < 16:
        problems.append("tiling.tile_size_px must be at least 16")
    if til.batch_tiles < 1:
        problems.append("tiling.batch_tiles must be at least 1")
    if not 0 <= cfg.max_error_fraction <= 1:
        problems.append("max_error_fraction is a fraction from 0 to 1")
    if cfg.output.rows_per_file < 1:
        problems.append("output.rows_per_file must be at least 1")
    if not cfg.output.flush_every_s > 0:
        problems.append("output.flush_every_s must be above 0 (seconds between results writes)")
    if cfg.output.overlays < 0:
        problems.append("output.overlays must be 0 or more")
    resize = cfg.preprocess.resize
    if isinstance(resize, str) and resize not in ("auto", "none"):
        problems.append(f"preprocess.resize: {resize!r}; use auto, none, an int or [h, w]")
    if isinstance(resize, int) and resize < 8:
        problems.append("preprocess.resize must be at least 8 pixels")
    pre = cfg.preprocess
    if pre.mean is not None and pre.std is not None and len(pre.mean) != len(pre.std):
        problems.append("preprocess.mean and preprocess.std need one value per channel each")
    if pre.std is not None and any(not s > 0 for s in pre.std):
        problems.append("preprocess.std values must be above 0")
    if pre.bands is not None and any(b < 1 for b in pre.bands):
        problems.append("preprocess.bands are 1-based band numbers (the first band is 1)")
    if pre.pad_to_multiple is not None and pre.pad_to_multiple < 1:
        problems.append("preprocess.pad_to_multiple must be at least 1")
    if model.classes is not None and model.num_classes not in (None, len(model.classes)):
        problems.append(
            f"model.classes names {len(model.classes)} classes but model.num_classes is "
            f"{model.num_classes}"
        )
    if ":" in model.name and model.code_path is None:
        problems.append(
            f"model.name {model.name!r} is a user model: set model.code_path to the directory "
            "or .py file holding its module"
        )
    if problems:
        raise ConfigError("invalid job configuration:\n  - " + "\n  - ".join(problems))


def parse_value(text: str) -> Any:
    """A --set value, read as YAML: 4 -> int, [1, 2] -> list, none -> 'none', null -> None."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        # YAML 1.1 reads '1e9' (no dot) as a string; a user writing it means a number.
        try:
            return float(value)
        except ValueError:
            return value
    return value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, checking each part against the tree."""
    known = set(all_keys())
    if key not in known:
        raise UnknownKeyError(f"unknown key {key!r}{closest(key, known)}")
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


class _JobFileLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping.

    Plain YAML keeps the last value silently: ``batch_size: 4`` further down a long file would
    undo an earlier ``batch_size: 32`` without a word.
    """

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            _check_unique_keys(node, "", set())
        return node


def _check_unique_keys(node: yaml.Node, prefix: str, seen_nodes: set[int]) -> None:
    """Raise ConfigError naming the dotted key and both lines of the first key set twice."""
    if id(node) in seen_nodes:  # an alias met again (or a recursive anchor)
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for child in node.value:
            _check_unique_keys(child, prefix, seen_nodes)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    lines: dict[str, int] = {}
    for key_node, value_node in node.value:
        # '<<' merges another mapping in; keys written next to it override those on purpose.
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue
        key = prefix + str(key_node.value)
        line = key_node.start_mark.line + 1
        if key in lines:
            raise ConfigError(
                f"key {key!r} is set twice (lines {lines[key]} and {line}); YAML would keep the "
                "last one silently: delete the one you do not mean"
            )
        lines[key] = line
        _check_unique_keys(value_node, key + ".", seen_nodes)


def load_job(
    job_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> JobConfig:
    """Build the config from a job file (or the defaults) and dotted-key overrides."""
    data: dict[str, Any] = {}
    if job_file is not None:
        path = Path(job_file)
        if not path.is_file():
            raise ConfigError(f"job file {str(path)!r} does not exist")
        try:
            loaded = yaml.load(path.read_text(), Loader=_JobFileLoader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"job file {str(path)!r} is not valid YAML: {exc}") from exc
        except ConfigError as exc:
            raise ConfigError(f"job file {str(path)!r}: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"job file {str(path)!r} must be a mapping of sections")
        data = loaded
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    cfg = _build(JobConfig, data)
    _check(cfg)
    return typing.cast(JobConfig, cfg)


def to_dict(cfg: Any) -> Any:
    """The config as plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple | list):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def to_yaml(cfg: JobConfig, redact_storage: bool = True) -> str:
    """The resolved config as YAML; storage options are redacted (they may hold credentials),
    and so are the URIs (``user:password@`` and signed query strings dropped, see io.redact)."""
    data = to_dict(cfg)
    if redact_storage:
        data["storage"]["options"] = {k: "<redacted>" for k in data["storage"]["options"]}
        data["input"]["paths"] = [io.redact(p) for p in data["input"]["paths"]]
        data["output"]["path"] = io.redact(data["output"]["path"])
        data["model"]["weights"] = io.redact(data["model"]["weights"])
    return yaml.safe_dump(data, sort_keys=False)
