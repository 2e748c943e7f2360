"""The job configuration (segbatch.config): dotted keys, YAML, validation, redaction."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from segbatch.config import JobConfig, all_keys, load_job, parse_value, to_dict, to_yaml
from segbatch.errors import ConfigError, SegbatchUsageError, UnknownKeyError

# One non-default, valid value for every leaf key, and what the frozen config holds afterwards.
LEAF_VALUES: dict[str, tuple[Any, Any]] = {
    "input.paths": (["a.png", "b/"], ("a.png", "b/")),
    "input.format": ("tar", "tar"),
    "input.image_column": ("img", "img"),
    "input.path_column": ("uri", "uri"),
    "input.max_image_pixels": (1000, 1000),
    "input.slice_axis": (1, 1),
    "input.volume_index": ("all", "all"),
    "input.follow_symlinks": (True, True),
    "output.path": ("s3://bucket/out", "s3://bucket/out"),
    "output.overwrite": (True, True),
    "output.resume": (True, True),
    "output.overlays": (0, 0),
    "output.rows_per_file": (7, 7),
    "output.flush_every_s": (5, 5.0),
    "output.mask_write_threads": (2, 2),
    "output.nodata_value": (0, 0),
    "model.name": ("unet", "unet"),
    "model.weights": ("none", "none"),
    "model.weights_id": ("none", "none"),
    "model.classes": (["bg", "cat"], ("bg", "cat")),
    "model.num_classes": (3, 3),
    "model.in_channels": (1, 1),
    "model.code_path": ("/models", "/models"),
    "model.unet.depth": (2, 2),
    "model.unet.base_channels": (8, 8),
    "preprocess.resize": ([520, 480], (520, 480)),
    "preprocess.pad_to_multiple": (32, 32),
    "preprocess.mean": ([0.5, 0.25, 1], (0.5, 0.25, 1.0)),
    "preprocess.std": ([0.5, 2], (0.5, 2.0)),
    "preprocess.bands": ([4, 3, 2], (4, 3, 2)),
    "preprocess.nodata": (-9999, -9999.0),
    "preprocess.stretch": ("percentile", "percentile"),
    "preprocess.stretch_percentiles": ([1, 99.5], (1.0, 99.5)),
    "preprocess.window": ({"center": 40, "width": 400}, {"center": 40, "width": 400}),
    "inference.device": ("cpu", "cpu"),
    "inference.batch_size": (16, 16),
    "inference.workers": ([1, 4], (1, 4)),
    "inference.gpus_per_worker": (0.5, 0.5),
    "inference.cpus_per_worker": (2, 2.0),
    "inference.threads_per_worker": (3, 3),
    "inference.post_threads": (0, 0),
    "inference.precision": ("bf16", "bf16"),
    "inference.channels_last": (True, True),
    "inference.resources": ({"worker_node": 1}, {"worker_node": 1}),
    "inference.max_input_attempts": (5, 5),
    "tiling.enabled": (False, False),
    "tiling.tile_size_px": (256, 256),
    "tiling.overlap": (0.5, 0.5),
    "tiling.blend": ("constant", "constant"),
    "tiling.batch_tiles": (2, 2),
    "tiling.stream_above_px": (1000, 1000),
    "tiling.segment_width_px": (2048, 2048),
    "storage.options": ({"anon": True}, {"anon": True}),
    "storage.retries": (0, 0),
    "stats.count_components": (["cat"], ("cat",)),
    "stats.min_component_px": (9, 9),
    "ray.address": ("auto", "auto"),
    "ray.progress_bars": (False, False),
    "max_error_fraction": (0.1, 0.1),
}


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _leaf_keys() -> list[str]:
    keys = all_keys()
    return [k for k in keys if not any(other.startswith(k + ".") for other in keys)]


def test_leaf_value_table_covers_every_key() -> None:
    # A new config key must get a row in LEAF_VALUES (and so a settability check).
    assert sorted(LEAF_VALUES) == sorted(_leaf_keys())


@pytest.mark.parametrize("key", sorted(LEAF_VALUES))
def test_every_dotted_key_is_settable(key: str) -> None:
    value, expected = LEAF_VALUES[key]
    default = _get(JobConfig(), key)
    assert default != expected, "pick a non-default value so the check means something"
    cfg = load_job(None, {key: value})
    got = _get(cfg, key)
    assert got == expected
    assert type(got) is type(expected)


def test_defaults_without_file_or_overrides() -> None:
    cfg = load_job()
    assert cfg == JobConfig()
    assert cfg.model.name == "lraspp_mobilenet_v3_large"
    assert cfg.preprocess.resize == "auto"
    assert cfg.inference.batch_size is None


def test_config_is_frozen() -> None:
    cfg = load_job()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.name = "x"  # type: ignore[misc]


def test_section_key_takes_a_mapping() -> None:
    cfg = load_job(None, {"model.unet": {"depth": 3}})
    assert cfg.model.unet.depth == 3
    assert cfg.model.unet.base_channels == 32


def test_yaml_job_file(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(
        "input:\n"
        "  paths: [photos/, extra.png]\n"
        "model:\n"
        "  name: unet\n"
        "  classes: [background, road]\n"
        "  unet: {depth: 3}\n"
        "preprocess:\n"
        "  resize: [256, 512]\n"
        "inference:\n"
        "  workers: 2\n"
        "max_error_fraction: 0.25\n"
    )
    cfg = load_job(job)
    assert cfg.input.paths == ("photos/", "extra.png")
    assert cfg.model.name == "unet"
    assert cfg.model.classes == ("background", "road")
    assert cfg.model.unet.depth == 3
    assert cfg.preprocess.resize == (256, 512)
    assert cfg.inference.workers == 2
    assert cfg.max_error_fraction == 0.25


def test_overrides_win_over_the_job_file(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("inference:\n  batch_size: 4\n  device: cpu\n")
    cfg = load_job(str(job), {"inference.batch_size": 32})
    assert cfg.inference.batch_size == 32
    assert cfg.inference.device == "cpu"  # the sibling from the file is kept


def test_empty_job_file_is_the_defaults(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("")
    assert load_job(job) == JobConfig()


@pytest.mark.parametrize(
    ("text", "message"),
    [("[1, 2", "not valid YAML"), ("- a\n- b\n", "must be a mapping")],
)
def test_bad_job_file(tmp_path: Path, text: str, message: str) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_job(job)


def test_missing_job_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_job(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("inference.batchsize", "inference.batch_size"),
        ("modle.name", "model.name"),
        ("tiling.tile_size", "tiling.tile_size_px"),
        ("output.overwrit", "output.overwrite"),
    ],
)
def test_unknown_override_names_the_closest_key(key: str, suggestion: str) -> None:
    with pytest.raises(UnknownKeyError) as info:
        load_job(None, {key: 1})
    assert f"did you mean {suggestion!r}" in str(info.value)
    assert repr(key) in str(info.value)
    assert isinstance(info.value, SegbatchUsageError)


def test_unknown_key_in_job_file_names_the_closest_key(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("inference:\n  batchsize: 8\n")
    with pytest.raises(UnknownKeyError, match=re.escape("did you mean 'inference.batch_size'")):
        load_job(job)


def test_unknown_key_far_from_everything_has_no_suggestion() -> None:
    with pytest.raises(UnknownKeyError) as info:
        load_job(None, {"zzzzqqqq": 1})
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("inference.batch_size", "x", "inference.batch_size"),
        ("inference.batch_size", 0, "batch_size must be at least 1"),
        ("inference.batch_size", 2.5, "inference.batch_size"),
        ("inference.batch_size", True, "inference.batch_size"),
        ("preprocess.resize", "big", "preprocess.resize"),
        ("preprocess.resize", 4, "at least 8"),
        ("preprocess.resize", [1, 2, 3], "preprocess.resize"),
        ("inference.workers", [3, 1], "min <= max"),
        ("inference.workers", 0, "workers must be at least 1"),
        ("inference.device", "tpu", "not one of"),
        ("output.overwrite", "yes", "expected true or false"),
        ("tiling.overlap", 1.0, "tiling.overlap"),
        ("tiling.tile_size_px", 8, "at least 16"),
        ("input.paths", "a.png", "expected a list"),
        ("model.unet", 3, "expected a mapping"),
        ("storage.options", [1], "expected a mapping"),
        ("max_error_fraction", 1.5, "max_error_fraction"),
        ("preprocess.std", [0.5, 0], "above 0"),
        ("preprocess.bands", [0, 1], "1-based"),
        ("inference.gpus_per_worker", 0, "above 0"),
        ("inference.threads_per_worker", 0, "at least 1"),
        ("inference.post_threads", -1, "0 or more"),
        ("output.flush_every_s", 0, "flush_every_s must be above 0"),
        ("output.flush_every_s", -1.5, "flush_every_s must be above 0"),
        ("inference.max_input_attempts", 0, "max_input_attempts must be at least 1"),
    ],
)
def test_type_and_range_errors(key: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_job(None, {key: value})


# Every numeric key with a range, one value outside it each: (key, bad value).
OUT_OF_RANGE: list[tuple[str, Any]] = [
    ("input.max_image_pixels", 0),
    ("input.max_image_pixels", -5),
    ("input.slice_axis", 3),
    ("input.slice_axis", -1),
    ("input.volume_index", -1),
    ("output.overlays", -1),
    ("output.rows_per_file", 0),
    ("output.mask_write_threads", 0),
    ("output.mask_write_threads", -2),
    ("output.nodata_value", -1),
    ("output.nodata_value", 65536),
    ("model.num_classes", 0),
    ("model.in_channels", 0),
    ("model.unet.depth", 0),
    ("model.unet.base_channels", 0),
    ("preprocess.resize", 4),
    ("preprocess.pad_to_multiple", 0),
    ("preprocess.std", [0.5, float("nan")]),
    ("preprocess.bands", [0]),
    ("preprocess.stretch_percentiles", [50, 50]),
    ("preprocess.stretch_percentiles", [98, 2]),
    ("preprocess.stretch_percentiles", [-1, 98]),
    ("preprocess.stretch_percentiles", [2, 101]),
    ("inference.batch_size", 0),
    ("inference.workers", 0),
    ("inference.workers", [0, 2]),
    ("inference.gpus_per_worker", 0),
    ("inference.gpus_per_worker", float("nan")),
    ("inference.cpus_per_worker", 0),
    ("inference.cpus_per_worker", -1.5),
    ("inference.threads_per_worker", 0),
    ("inference.post_threads", -1),
    ("inference.resources", {"worker_node": 0}),
    ("tiling.tile_size_px", 8),
    ("tiling.overlap", -0.1),
    ("tiling.batch_tiles", 0),
    ("tiling.stream_above_px", 0),
    ("tiling.segment_width_px", 0),
    ("tiling.segment_width_px", 1000),  # narrower than the default 1024 px tile
    ("storage.retries", -1),
    ("stats.min_component_px", 0),
    ("stats.min_component_px", -3),
    ("max_error_fraction", -0.5),
]


@pytest.mark.parametrize(("key", "value"), OUT_OF_RANGE)
def test_out_of_range_values_are_refused_naming_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        load_job(None, {key: value})
    message = str(info.value)
    assert message.startswith("invalid job configuration:")
    problems = message.splitlines()[1:]
    assert len(problems) == 1, message  # this value alone is wrong
    assert key in problems[0]


def test_out_of_range_cli_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    from segbatch.cli import EXIT_USAGE, main

    code = main(["validate", "--set", "input.max_image_pixels=0", "--set", "storage.retries=-1"])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "input.max_image_pixels must be at least 1" in err
    assert "storage.retries must be 0 or more" in err


def test_every_range_problem_is_listed_at_once() -> None:
    bad = {
        "input.max_image_pixels": 0,
        "storage.retries": -1,
        "output.mask_write_threads": 0,
        "stats.min_component_px": 0,
    }
    with pytest.raises(ConfigError) as info:
        load_job(None, bad)
    problems = str(info.value).splitlines()[1:]
    assert sorted(p.split()[1] for p in problems) == sorted(bad)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("input.slice_axis", 0),
        ("input.volume_index", 0),
        ("output.nodata_value", 65535),
        ("preprocess.stretch_percentiles", [0, 100]),
        ("inference.cpus_per_worker", 0.5),
        ("tiling.segment_width_px", 1024),  # as wide as the tile
        ("stats.min_component_px", 1),
    ],
)
def test_values_at_the_edge_of_their_range_are_accepted(key: str, value: Any) -> None:
    cfg = load_job(None, {key: value})
    got = _get(cfg, key)
    assert got == (tuple(value) if isinstance(value, list) else value)


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        ("inference:\n  batch_size: 32\n  device: cpu\n  batch_size: 4\n", "inference.batch_size",
         (2, 4)),
        ("model:\n  name: unet\nmax_error_fraction: 0.1\nmodel:\n  weights: none\n", "model",
         (1, 4)),
        ("model:\n  unet: {depth: 2, depth: 3}\n", "model.unet.depth", (2, 2)),
        ("input:\n  paths: [a.png]\n  paths:\n    - b.png\n", "input.paths", (2, 3)),
    ],
)  # fmt: skip
def test_duplicate_keys_in_a_job_file_are_refused(
    tmp_path: Path, text: str, key: str, lines: tuple[int, int]
) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_job(job)
    message = str(info.value)
    assert f"key {key!r} is set twice (lines {lines[0]} and {lines[1]})" in message
    assert "job.yaml" in message


def test_duplicate_key_cli_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from segbatch.cli import EXIT_USAGE, main

    job = tmp_path / "job.yaml"
    job.write_text("output:\n  path: a\n  path: b\n")
    assert main(["validate", str(job)]) == EXIT_USAGE
    assert "'output.path' is set twice (lines 2 and 3)" in capsys.readouterr().err


def test_merge_key_overridden_by_an_explicit_key_is_fine(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("inference:\n  <<: {batch_size: 4, device: cpu}\n  batch_size: 8\n")
    cfg = load_job(job)
    assert cfg.inference.batch_size == 8 and cfg.inference.device == "cpu"


def test_cross_field_checks() -> None:
    with pytest.raises(ConfigError, match="one value per channel"):
        load_job(None, {"preprocess.mean": [0.5, 0.5], "preprocess.std": [0.5]})
    with pytest.raises(ConfigError, match=re.escape("model.num_classes is 3")):
        load_job(None, {"model.classes": ["a", "b"], "model.num_classes": 3})
    cfg = load_job(None, {"model.classes": ["a", "b"], "model.num_classes": 2})
    assert cfg.model.num_classes == 2


def test_user_model_needs_code_path() -> None:
    with pytest.raises(ConfigError, match=re.escape("model.code_path")):
        load_job(None, {"model.name": "pkg:build"})
    cfg = load_job(None, {"model.name": "pkg:build", "model.code_path": "models/"})
    assert cfg.model.name == "pkg:build"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4", 4),
        ("0.5", 0.5),
        ("[1, 2]", [1, 2]),
        ("none", "none"),
        ("null", None),
        ("auto", "auto"),
        ("true", True),
        ("s3://bucket/x", "s3://bucket/x"),
        ("{center: 40, width: 400}", {"center": 40, "width": 400}),
    ],
)
def test_parse_value(text: str, expected: Any) -> None:
    got = parse_value(text)
    assert got == expected
    assert type(got) is type(expected)


def test_parse_value_keeps_unparseable_text() -> None:
    assert parse_value("[1, 2") == "[1, 2"


def test_parse_value_reads_exponent_floats() -> None:
    assert parse_value("-1e9") == -1e9
    assert load_job(None, {"preprocess.nodata": parse_value("-1e9")}).preprocess.nodata == -1e9


def test_set_resize_pair_becomes_a_tuple() -> None:
    cfg = load_job(None, {"preprocess.resize": parse_value("[520, 520]")})
    assert cfg.preprocess.resize == (520, 520)
    assert isinstance(cfg.preprocess.resize, tuple)


@pytest.mark.parametrize(("text", "expected"), [("none", "none"), ("auto", "auto"), ("512", 512)])
def test_set_resize_scalar_forms(text: str, expected: Any) -> None:
    assert load_job(None, {"preprocess.resize": parse_value(text)}).preprocess.resize == expected


def test_lists_become_tuples_everywhere() -> None:
    cfg = load_job(
        None,
        {
            "input.paths": ["a", "b"],
            "stats.count_components": ["x"],
            "preprocess.mean": [1, 2, 3],
            "preprocess.std": [1, 1, 1],
        },
    )
    assert cfg.input.paths == ("a", "b")
    assert cfg.stats.count_components == ("x",)
    assert cfg.preprocess.mean == (1.0, 2.0, 3.0)
    assert all(isinstance(v, float) for v in cfg.preprocess.mean)
    hash(cfg.input)  # frozen and made of tuples: hashable


def test_to_yaml_redacts_storage_options() -> None:
    cfg = load_job(
        None,
        {"storage.options": {"key": "AKIASECRET", "secret": "hunter2"}, "model.name": "unet"},
    )
    text = to_yaml(cfg)
    assert "AKIASECRET" not in text
    assert "hunter2" not in text
    data = yaml.safe_load(text)
    assert data["storage"]["options"] == {"key": "<redacted>", "secret": "<redacted>"}
    assert data["model"]["name"] == "unet"
    # The config itself still holds the real values.
    assert cfg.storage.options["secret"] == "hunter2"
    assert yaml.safe_load(to_yaml(cfg, redact_storage=False))["storage"]["options"]["secret"] == (
        "hunter2"
    )


def test_to_yaml_redacts_credentials_in_uris() -> None:
    cfg = load_job(
        None,
        {
            "input.paths": ["http://alice:Pa55w0rd@host/a.png", "/data/b@2x.png"],
            "output.path": "webdav://bob:S3cr3t@dav.example/out",
            "model.name": "unet",
            "model.weights": "https://host/unet.pt?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA1",
        },
    )
    text = to_yaml(cfg)
    for secret in ("alice", "Pa55w0rd", "bob", "S3cr3t", "deadbeef", "AKIA1"):
        assert secret not in text
    data = yaml.safe_load(text)
    assert data["input"]["paths"] == ["http://host/a.png", "/data/b@2x.png"]
    assert data["output"]["path"] == "webdav://dav.example/out"
    assert data["model"]["weights"] == "https://host/unet.pt"
    assert cfg.model.weights.endswith("X-Amz-Credential=AKIA1")  # the config keeps the real URI


def test_to_yaml_round_trips_through_load_job(tmp_path: Path) -> None:
    cfg = load_job(
        None,
        {"preprocess.resize": [520, 520], "input.paths": ["a"], "inference.workers": [1, 2]},
    )
    job = tmp_path / "job.yaml"
    job.write_text(to_yaml(cfg))
    assert load_job(job) == cfg
    assert to_dict(cfg)["preprocess"]["resize"] == [520, 520]


LIGHT, HEAVY = 3_200_000, 42_000_000  # lraspp_mobilenet_v3_large, deeplabv3_resnet50


@pytest.mark.parametrize(
    ("overrides", "cpus", "gpus", "params", "expected"),
    [
        # CPU, light model: one actor per core with one torch thread, no mask thread beside it
        # (measured: docs/performance.md); above CPU_WORKERS_MAX actors, cores go to threads.
        ({}, 2, 0, LIGHT, {"workers": 2, "batch_size": 1, "threads_per_worker": 1}),
        ({}, 2, 0, LIGHT, {"post_threads": 0}),
        ({}, 1, 0, LIGHT, {"workers": 1, "threads_per_worker": 1, "post_threads": 0}),
        ({}, 16, 0, LIGHT, {"workers": 4, "threads_per_worker": 4, "post_threads": 0}),
        ({}, 6, 0, LIGHT, {"workers": 4, "threads_per_worker": 1, "post_threads": 1}),
        # CPU, heavy or unknown model: one actor per 8 cores, all cores as torch threads.
        ({}, 2, 0, HEAVY, {"workers": 1, "threads_per_worker": 2, "post_threads": 0}),
        ({}, 2, 0, None, {"workers": 1, "threads_per_worker": 2}),
        ({}, 32, 0, HEAVY, {"workers": 4, "threads_per_worker": 8}),
        # What the job sets wins; the rest follows from it.
        ({"inference.workers": 1}, 2, 0, LIGHT, {"threads_per_worker": 2, "post_threads": 0}),
        ({"inference.threads_per_worker": 2}, 8, 0, LIGHT, {"workers": 4, "post_threads": 0}),
        ({"inference.workers": [1, 3]}, 12, 0, HEAVY, {"threads_per_worker": 4}),
        # Fewer torch threads than cores: the free core makes masks meanwhile.
        (
            {"inference.workers": 1, "inference.threads_per_worker": 1},
            2,
            0,
            HEAVY,
            {"post_threads": 1},
        ),
        ({"inference.post_threads": 2}, 2, 0, LIGHT, {"post_threads": 2}),
        # GPU: one actor per GPU, masks made while the next batch runs.
        ({}, 16, 4, LIGHT, {"device": "cuda", "workers": 4, "batch_size": 16, "post_threads": 1}),
        ({"inference.gpus_per_worker": 0.5}, 16, 1, HEAVY, {"workers": 2}),
    ],
)
def test_per_device_defaults(overrides: dict[str, Any], cpus, gpus, params, expected) -> None:
    from segbatch.pipeline import resolve_inference

    inf = resolve_inference(load_job(None, overrides).inference, cpus, gpus, params)
    assert {k: getattr(inf, k) for k in expected} == expected


@pytest.mark.parametrize(
    ("name", "light"),
    [("lraspp_mobilenet_v3_large", True), ("unet", True), ("deeplabv3_resnet50", False)],
)
def test_parameter_count_sorts_models_without_building_them(name: str, light: bool) -> None:
    from segbatch.config import ModelConfig, PreprocessConfig
    from segbatch.models import parameter_count, resolve_model
    from segbatch.pipeline import LIGHT_MODEL_PARAMS

    count = parameter_count(
        resolve_model(ModelConfig(name=name, weights="none"), PreprocessConfig())
    )
    assert count is not None and (count < LIGHT_MODEL_PARAMS) == light
