"""Listing inputs (segbatch.sources): directories, globs, files, manifests, naming."""

from __future__ import annotations

import io as stdio
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from segbatch import io
from segbatch.config import InputConfig
from segbatch.errors import ConfigError, InputNotFoundError
from segbatch.sinks import mask_rel_path
from segbatch.sources import InputItem, extension_of, list_inputs


def _touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not decoded here")


def _list(*paths: str | Path, **kwargs: Any) -> list[InputItem]:
    return list_inputs(InputConfig(paths=tuple(str(p) for p in paths), **kwargs))


@pytest.mark.parametrize(
    ("uri", "ext"),
    [
        ("a/b.PNG", ".png"),
        ("x.JpEg", ".jpeg"),
        ("s3://b/scan.NII.GZ", ".nii.gz"),
        ("v.nii", ".nii"),
        ("dir.d/noext", ""),
        ("archive.tar.gz", ".gz"),
    ],
)
def test_extension_of(uri: str, ext: str) -> None:
    assert extension_of(uri) == ext


def test_directory_is_recursive_and_sorted(tmp_path: Path) -> None:
    _touch(tmp_path, "z.png", "b/y.jpg", "a/x.tif", "a/c/w.bmp", "m.webp")
    items = _list(tmp_path)
    assert [i.rel_path for i in items] == ["a/c/w.bmp", "a/x.tif", "b/y.jpg", "m.webp", "z.png"]
    assert [i.uri for i in items] == [str(tmp_path / i.rel_path) for i in items]
    assert all(i.error is None for i in items)
    assert _list(tmp_path) == items  # deterministic
    assert _list(str(tmp_path) + "/") == items


def test_inputs_keep_the_order_given(tmp_path: Path) -> None:
    _touch(tmp_path, "one/b.png", "one/a.png", "two/c.png")
    items = _list(tmp_path / "two", tmp_path / "one")
    assert [i.rel_path for i in items] == ["c.png", "a.png", "b.png"]


def test_extensions_are_case_insensitive(tmp_path: Path) -> None:
    _touch(tmp_path, "a.PNG", "b.JpEg", "c.TIFF", "d.Nii.Gz", "e.DCM")
    items = _list(tmp_path)
    assert [i.rel_path for i in items] == ["a.PNG", "b.JpEg", "c.TIFF", "d.Nii.Gz", "e.DCM"]
    assert [i.error for i in items] == [None] * 5


def test_unsupported_files_become_error_items(tmp_path: Path) -> None:
    _touch(tmp_path, "a.png", "notes.txt", "raw.cr2", "README")
    items = {i.rel_path: i for i in _list(tmp_path)}
    assert sorted(items) == ["README", "a.png", "notes.txt", "raw.cr2"]
    assert items["a.png"].error is None
    for name, shown in [("notes.txt", ".txt"), ("raw.cr2", ".cr2"), ("README", "no extension")]:
        error = items[name].error
        assert error is not None
        assert f"unsupported file type ({shown})" in error
        for ext in ("png", "jpg", "tif", "nii.gz", "dcm"):
            assert ext in error


def test_hidden_files_and_sidecars_are_skipped(tmp_path: Path) -> None:
    _touch(
        tmp_path,
        "a.tif",
        "a.tif.aux.xml",
        "a.tif.ovr",
        "a.tfw",
        "b.PNG.AUX.XML",
        ".hidden.png",
        ".cache/c.png",
        "sub/.DS_Store",
        "sub/d.png",
    )
    assert [i.rel_path for i in _list(tmp_path)] == ["a.tif", "sub/d.png"]


def test_hidden_parent_of_the_root_does_not_hide_it(tmp_path: Path) -> None:
    _touch(tmp_path, ".data/imgs/a.png")
    assert [i.rel_path for i in _list(tmp_path / ".data" / "imgs")] == ["a.png"]


def test_single_file(tmp_path: Path) -> None:
    _touch(tmp_path, "deep/er/photo.JPG")
    items = _list(tmp_path / "deep/er/photo.JPG")
    assert items == [InputItem(str(tmp_path / "deep/er/photo.JPG"), "photo.JPG")]


def test_glob(tmp_path: Path) -> None:
    _touch(tmp_path, "imgs/b.png", "imgs/a.png", "imgs/c.jpg", "imgs/sub/d.png", "imgs/.e.png")
    items = _list(f"{tmp_path}/imgs/*.png")
    assert [i.rel_path for i in items] == ["a.png", "b.png"]
    deep = _list(f"{tmp_path}/imgs/**/*.png")
    assert "sub/d.png" in [i.rel_path for i in deep]
    assert ".e.png" not in [i.rel_path for i in deep]


def test_glob_that_matches_nothing(tmp_path: Path) -> None:
    _touch(tmp_path, "a.png")
    with pytest.raises(InputNotFoundError, match="matched no file"):
        _list(f"{tmp_path}/*.jpg")


def test_existing_file_with_glob_characters(tmp_path: Path) -> None:
    _touch(tmp_path, "img [1].png")
    assert [i.rel_path for i in _list(tmp_path / "img [1].png")] == ["img [1].png"]


def test_txt_manifest(tmp_path: Path) -> None:
    _touch(tmp_path, "data/a.png", "data/sub/b.png", "elsewhere/c.jpg")
    manifest = tmp_path / "data" / "list.txt"
    manifest.write_text(
        f"# images to segment\n\nsub/b.png\n   \na.png\n{tmp_path}/elsewhere/c.jpg\n"
    )
    items = _list(manifest)
    assert [i.uri for i in items] == [
        f"{tmp_path}/data/sub/b.png",
        f"{tmp_path}/data/a.png",
        f"{tmp_path}/elsewhere/c.jpg",
    ]
    # Named relative to the entries' common folder, so distinct inputs get distinct names.
    assert [i.rel_path for i in items] == ["data/sub/b.png", "data/a.png", "elsewhere/c.jpg"]
    assert all(i.error is None for i in items)


def test_txt_manifest_entries_are_not_checked_for_existence(tmp_path: Path) -> None:
    # A missing entry becomes a read error row later, not a failure of the whole job.
    manifest = tmp_path / "list.txt"
    manifest.write_text("missing.png\n")
    assert [i.uri for i in _list(manifest)] == [f"{tmp_path}/missing.png"]


def test_txt_manifest_indented_comment(tmp_path: Path) -> None:
    _touch(tmp_path, "a.png")
    manifest = tmp_path / "list.txt"
    manifest.write_text("  # indented comment\na.png\n")
    assert [i.rel_path for i in _list(manifest)] == ["a.png"]


def test_txt_manifest_same_file_spelled_twice(tmp_path: Path) -> None:
    _touch(tmp_path, "a.png")
    manifest = tmp_path / "list.txt"
    manifest.write_text("a.png\n./a.png\n")
    assert len(_list(manifest)) == 1


def test_csv_manifest(tmp_path: Path) -> None:
    _touch(tmp_path, "imgs/a.png", "imgs/b.png")
    manifest = tmp_path / "list.csv"
    manifest.write_text("id,path\n1,imgs/b.png\n2, imgs/a.png \n3,\n")
    items = _list(manifest)
    assert [i.uri for i in items] == [f"{tmp_path}/imgs/b.png", f"{tmp_path}/imgs/a.png"]
    assert [i.rel_path for i in items] == ["b.png", "a.png"]


def test_csv_manifest_other_column(tmp_path: Path) -> None:
    _touch(tmp_path, "a.png")
    manifest = tmp_path / "list.csv"
    manifest.write_text("file\na.png\n")
    with pytest.raises(ConfigError) as info:
        _list(manifest)
    assert "input.path_column" in str(info.value)
    assert "'path'" in str(info.value)
    assert [i.uri for i in _list(manifest, path_column="file")] == [f"{tmp_path}/a.png"]


def test_parquet_manifest(tmp_path: Path) -> None:
    _touch(tmp_path, "x/a.png", "x/b.jpg")
    manifest = tmp_path / "list.parquet"
    pq.write_table(
        pa.table({"path": ["x/b.jpg", f"{tmp_path}/x/a.png", None], "label": [1, 2, 3]}),
        manifest,
    )
    items = _list(manifest)
    assert [i.uri for i in items] == [f"{tmp_path}/x/b.jpg", f"{tmp_path}/x/a.png"]
    assert [i.rel_path for i in items] == ["b.jpg", "a.png"]


def test_parquet_manifest_without_path_column(tmp_path: Path) -> None:
    manifest = tmp_path / "list.parquet"
    pq.write_table(pa.table({"uri": ["a.png"]}), manifest)
    with pytest.raises(ConfigError, match=re.escape("input.path_column")):
        _list(manifest)
    assert [i.uri for i in _list(manifest, path_column="uri")] == [f"{tmp_path}/a.png"]


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="does not exist"):
        _list(tmp_path / "nope")
    assert issubclass(InputNotFoundError, FileNotFoundError)


def test_no_paths_at_all() -> None:
    with pytest.raises(InputNotFoundError, match=re.escape("input.paths")):
        list_inputs(InputConfig())


@pytest.mark.parametrize("names", [(), ("notes.txt", "a.tif.aux.xml", ".hidden.png")])
def test_directory_without_images(tmp_path: Path, names: tuple[str, ...]) -> None:
    (tmp_path / "d").mkdir()
    _touch(tmp_path / "d", *names)
    with pytest.raises(InputNotFoundError, match="no image files found"):
        _list(tmp_path / "d")


def test_duplicates_are_removed(tmp_path: Path) -> None:
    _touch(tmp_path, "a.png", "b.png")
    items = _list(tmp_path, tmp_path / "a.png", f"{tmp_path}/*.png", tmp_path)
    assert [i.uri for i in items] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]


def test_rel_path_collisions_get_a_counter(tmp_path: Path) -> None:
    _touch(tmp_path, "one/x.png", "one/y.png", "two/x.png", "three/X.PNG")
    items = _list(tmp_path / "one", tmp_path / "two", tmp_path / "three")
    assert [(i.uri, i.rel_path) for i in items] == [
        (str(tmp_path / "one/x.png"), "x.png"),
        (str(tmp_path / "one/y.png"), "y.png"),
        (str(tmp_path / "two/x.png"), "x~1.png"),
        (str(tmp_path / "three/X.PNG"), "X~2.PNG"),  # case-insensitive stores would collide too
    ]


def test_same_stem_different_extension_gets_distinct_masks(tmp_path: Path) -> None:
    _touch(tmp_path, "a.png", "a.jpg")
    items = _list(tmp_path)
    assert len({mask_rel_path(i.rel_path) for i in items}) == len(items)


def test_memory_directory(memfs: Any) -> None:
    for name in ["imgs/b/x.png", "imgs/a.PNG", "imgs/.hidden.png", "imgs/a.PNG.aux.xml"]:
        memfs.pipe(f"/{name}", b"x")
    items = _list("memory://imgs")
    assert [(i.uri, i.rel_path) for i in items] == [
        ("memory:///imgs/a.PNG", "a.PNG"),
        ("memory:///imgs/b/x.png", "b/x.png"),
    ]
    # The URIs listed are readable as given.
    assert [i.uri for i in _list(*[i.uri for i in items])] == [i.uri for i in items]


def test_memory_glob_and_manifest(memfs: Any) -> None:
    memfs.pipe("/m/a.png", b"x")
    memfs.pipe("/m/b.jpg", b"x")
    memfs.pipe("/m/list.txt", b"b.jpg\na.png\n")
    assert [i.uri for i in _list("memory://m/*.png")] == ["memory:///m/a.png"]
    items = _list("memory://m/list.txt")
    assert [i.rel_path for i in items] == ["b.jpg", "a.png"]
    assert [i.uri.split("://", 1)[1].lstrip("/") for i in items] == ["m/b.jpg", "m/a.png"]
    assert all(i.uri.startswith("memory://") for i in items)


def _mask_keys(items: list[InputItem]) -> list[str]:
    """The name each item's outputs get, as a case-insensitive store sees it."""
    return [mask_rel_path(i.rel_path, "").lower() for i in items if i.error is None]


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        # A renamed duplicate must not take the name of a file that exists.
        (["x/img.png", "x/img.jpg", "x/img~1.png"], ["x/img~2.png", "x/img.jpg", "x/img~1.png"]),
        # A chain: every '~N' already spoken for by a real file.
        (
            ["a.png", "a.jpg", "a~1.png", "a~1.jpg"],
            ["a~2.png", "a.jpg", "a~1~1.png", "a~1.jpg"],
        ),
        # Control characters fold to '_'.
        (["n\nl.png", "n_l.png"], ["n_l~1.png", "n_l.png"]),
        # Case-insensitive stores (macOS, Windows, synced folders) fold case.
        (["A.png", "a.PNG"], ["A.png", "a~1.PNG"]),
        # Stems collide whatever the mask suffix: .png, .tif and .nii.gz masks of one stem.
        (
            ["s.nii.gz", "s.png", "s.tif", "s~1.nii.gz"],
            ["s.nii.gz", "s~2.png", "s~3.tif", "s~1.nii.gz"],
        ),
    ],
)
def test_mask_names_are_unique_after_cleaning(
    tmp_path: Path, names: list[str], expected: list[str]
) -> None:
    _touch(tmp_path, *names)
    items = _list(tmp_path)
    got = {i.uri: i.rel_path for i in items}
    assert [got[str(tmp_path / n)] for n in names] == expected
    keys = _mask_keys(items)
    assert len(set(keys)) == len(keys) == len(names)
    # Cleaned once, in list_inputs: the sinks' own cleaning changes nothing any more.
    assert all(io.safe_relpath(i.rel_path) == i.rel_path for i in items)
    assert _list(tmp_path) == items  # same inputs, same names


def test_tar_members_that_clean_to_one_name_get_distinct_masks(tmp_path: Path) -> None:
    import tarfile

    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name in ["x.png", "../x.png", "./x.png", "X.PNG"]:
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, stdio.BytesIO(b"x"))
    items = _list(tmp_path / "s.tar")
    assert [i.uri.rsplit("#", 1)[1] for i in items] == ["x.png", "../x.png", "./x.png", "X.PNG"]
    # rel_path is already clean: the mask name is the rel path with the mask suffix.
    assert [i.rel_path for i in items] == ["s/x.png", "s/x~1.png", "s/x~2.png", "s/X~3.PNG"]
    keys = _mask_keys(items)
    assert len(set(keys)) == len(keys) == 4


def test_error_items_do_not_take_mask_names(tmp_path: Path) -> None:
    _touch(tmp_path, "a.cr2", "a.png")
    items = {i.uri: i for i in _list(tmp_path)}
    assert items[str(tmp_path / "a.png")].rel_path == "a.png"
    assert items[str(tmp_path / "a.cr2")].error is not None


def test_same_file_spelled_twice_is_listed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _touch(tmp_path, "in/a.png", "in/b.png")
    monkeypatch.chdir(tmp_path)
    items = _list("in", "in/./a.png", "./in//b.png", f"file://{tmp_path}/in/a.png")
    assert [i.uri for i in items] == [f"{tmp_path}/in/a.png", f"{tmp_path}/in/b.png"]
    # A manifest naming one file relatively and absolutely.
    (tmp_path / "list.txt").write_text(f"in/a.png\n{tmp_path}/in/a.png\nin/../in/b.png\n")
    items = _list("list.txt")
    assert [i.uri for i in items] == [f"{tmp_path}/in/a.png", f"{tmp_path}/in/b.png"]


def test_same_object_spelled_twice_is_listed_once(memfs: Any) -> None:
    memfs.pipe("/m/a.png", b"x")
    memfs.pipe("/l/list.txt", b"../m/a.png\nmemory:///m/a.png\n")
    items = _list("memory://m", "MEMORY://m/./a.png", "memory://l/list.txt")
    assert [i.uri for i in items] == ["memory:///m/a.png"]


def test_output_folder_is_never_an_input(tmp_path: Path) -> None:
    _touch(tmp_path, "in/a.png", "in/out/job.yaml", "in/out/masks/a.png", "in/outside.png")
    out = str(tmp_path / "in" / "out")
    expected = [str(tmp_path / "in/a.png"), str(tmp_path / "in/outside.png")]
    cfg = InputConfig(paths=(str(tmp_path / "in"),))
    assert [i.uri for i in list_inputs(cfg, output_root=out)] == expected
    assert [i.uri for i in list_inputs(cfg, output_root=out + "/./")] == expected
    glob = InputConfig(paths=(f"{tmp_path}/in/**/*.png",))
    assert [i.uri for i in list_inputs(glob, output_root=out)] == expected
    (tmp_path / "list.txt").write_text("in/a.png\nin/out/masks/a.png\n")
    manifest = InputConfig(paths=(str(tmp_path / "list.txt"),))
    assert [i.uri for i in list_inputs(manifest, output_root=out)] == expected[:1]
    with pytest.raises(InputNotFoundError, match="output folder"):
        list_inputs(InputConfig(paths=(out,)), output_root=out)


@pytest.fixture
def linked(tmp_path: Path) -> Path:
    """in/ with links inside it (to a file, to a folder) and leaving it (file, folder, loop)."""
    _touch(tmp_path, "in/a.png", "in/sub/s.png", "outside/o.png")
    (tmp_path / "in/leak.png").symlink_to(tmp_path / "outside/o.png")
    (tmp_path / "in/linkdir").symlink_to(tmp_path / "outside")
    (tmp_path / "in/inside.png").symlink_to(tmp_path / "in/a.png")
    (tmp_path / "in/insidedir").symlink_to(tmp_path / "in/sub")
    (tmp_path / "in/sub/loop").symlink_to(tmp_path / "in")
    return tmp_path


def test_symlinks_leaving_the_input_folder_are_error_rows(linked: Path) -> None:
    items = {i.uri: i for i in _list(linked / "in")}
    root = linked / "in"
    assert sorted(items) == sorted(
        str(root / n)
        for n in ["a.png", "inside.png", "insidedir/s.png", "leak.png", "linkdir", "sub/s.png"]
    )
    for name in ["a.png", "inside.png", "insidedir/s.png", "sub/s.png"]:
        assert items[str(root / name)].error is None, name
    for name in ["leak.png", "linkdir"]:
        error = items[str(root / name)].error
        assert error is not None and "symlink leaves the input folder" in error, name
        assert "input.follow_symlinks: true" in error
    glob = {i.uri: i.error for i in _list(f"{root}/*.png")}
    assert glob[str(root / "inside.png")] is None
    assert "symlink leaves" in str(glob[str(root / "leak.png")])


def test_follow_symlinks_reads_links_leaving_the_folder(linked: Path) -> None:
    root = linked / "in"
    items = {i.uri: i for i in _list(root, follow_symlinks=True)}
    for name in ["leak.png", "linkdir/o.png"]:
        assert items[str(root / name)].error is None
    assert str(root / "linkdir") not in items
    assert all(i.error is None for i in items.values())
