from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from segbatch.overlays import (
    MAX_LEGEND_ENTRIES,
    NODATA_RGB,
    colorize,
    flat_palette,
    legend_entries,
    palette,
    panel_boxes,
    render_panels,
    save_panels,
)

NAMES = ["background", "road", "building", "tree", "water"]


def _crop(img: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    return np.asarray(img.crop(box))


def _scene(height: int = 40, width: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Uniform grey-ish image with a few class blocks, so panel pixels have known values."""
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = (200, 100, 50)
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, width // 2 :] = 2  # right half: building
    mask[: height // 4, : width // 4] = 4  # top-left block: water
    mask[-4:, :4] = 255  # bottom-left corner: nodata
    return image, mask


def test_palette_starts_with_voc_colours() -> None:
    colours = palette(21)
    assert colours[:5] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128)]
    assert colours[15] == (192, 128, 128)  # VOC 'person'
    assert colours[20] == (0, 64, 128)  # VOC 'tvmonitor'
    assert len(colours) == 256
    assert colours[255] == NODATA_RGB


def test_palette_above_255_classes_is_distinct_and_has_no_nodata_entry() -> None:
    colours = palette(300)
    assert len(colours) == 300
    assert len(set(colours[:256])) == 256
    assert len(set(colours)) == 300
    assert colours[255] == (224, 224, 192)  # a real class now, its VOC colour
    assert palette(300)[:256] == palette(256)[:256]


def test_palette_is_deterministic_and_rejects_zero_classes() -> None:
    assert palette(70_000) == palette(70_000)
    with pytest.raises(ValueError, match="num_classes"):
        palette(0)


def test_flat_palette_is_putpalette_ready() -> None:
    flat = flat_palette(21)
    assert len(flat) == 768
    assert flat[:6] == [0, 0, 0, 128, 0, 0]
    assert tuple(flat[255 * 3 :]) == NODATA_RGB
    indexed = Image.fromarray(np.array([[1, 255]], dtype=np.uint8), mode="P")
    indexed.putpalette(flat)
    assert indexed.convert("RGB").getpixel((0, 0)) == (128, 0, 0)
    assert indexed.convert("RGB").getpixel((1, 0)) == NODATA_RGB


def test_colorize_maps_every_class_to_its_palette_colour() -> None:
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 21, size=(17, 23), dtype=np.uint8)
    mask[0, 0] = 255
    rgb = colorize(mask, 21)
    assert rgb.shape == (17, 23, 3)
    assert rgb.dtype == np.uint8
    colours = palette(21)
    for value in np.unique(mask):
        assert (rgb[mask == value] == colours[value]).all()
    assert tuple(rgb[0, 0]) == NODATA_RGB


def test_colorize_uint16_mask_with_many_classes() -> None:
    mask = np.array([[0, 255, 256, 299]], dtype=np.uint16)
    rgb = colorize(mask, 300)
    colours = palette(300)
    assert [tuple(v) for v in rgb[0]] == [colours[0], colours[255], colours[256], colours[299]]
    assert tuple(rgb[0, 1]) != NODATA_RGB


def test_colorize_rejects_float_masks() -> None:
    with pytest.raises(ValueError, match="integer"):
        colorize(np.zeros((2, 2), dtype=np.float32), 3)


def test_legend_entries_lists_present_classes_by_pixel_count() -> None:
    mask = np.zeros((10, 10), dtype=np.uint8)
    mask[:, 5:] = 2  # 50 px
    mask[:3, :5] = 4  # 15 px
    mask[9, :5] = 255  # 5 px nodata, not a class
    entries = legend_entries(mask, NAMES)
    assert [(i, name) for i, name, _ in entries] == [
        (2, "building"),
        (0, "background"),
        (4, "water"),
    ]
    assert [pct for _, _, pct in entries] == pytest.approx([50.0, 30.0, 15.0])


def test_legend_entries_names_unknown_indices_and_treats_255_as_class_above_255() -> None:
    mask = np.array([[7, 7, 255]], dtype=np.uint16)
    assert [(i, n) for i, n, _ in legend_entries(mask, NAMES)] == [(7, "class 7")]
    many = [f"c{i}" for i in range(300)]
    assert [(i, n) for i, n, _ in legend_entries(mask, many)] == [(7, "c7"), (255, "c255")]


def test_render_panels_layout_and_mask_panel_colours() -> None:
    image, mask = _scene()
    img = render_panels(image, mask, NAMES)
    boxes = panel_boxes(40, 60)
    assert img.mode == "RGB"
    assert [b[2] - b[0] for b in boxes] == [60, 60, 60]
    assert [b[3] - b[1] for b in boxes] == [40, 40, 40]
    assert 3 * 60 <= img.width <= 3 * 60 + 60  # three panels plus margins and gaps
    assert img.height > 40 + 20  # titles above, legend below

    image_panel = _crop(img, boxes[0])
    mask_panel = _crop(img, boxes[1])
    np.testing.assert_array_equal(image_panel, image)
    np.testing.assert_array_equal(mask_panel, colorize(mask, len(NAMES)))
    assert tuple(mask_panel[20, 45]) == palette(5)[2]
    assert tuple(mask_panel[2, 2]) == palette(5)[4]
    assert tuple(mask_panel[-1, 0]) == NODATA_RGB


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_overlay_panel_is_the_alpha_blend(alpha: float) -> None:
    image, mask = _scene()
    img = render_panels(image, mask, NAMES, alpha=alpha)
    overlay = _crop(img, panel_boxes(40, 60)[2]).astype(np.int16)
    for y, x, cls in [(20, 45, 2), (2, 2, 4), (30, 10, 0)]:
        colour = np.array(palette(5)[cls], dtype=np.float64)
        expected = np.round(alpha * colour + (1 - alpha) * image[y, x])
        assert np.abs(overlay[y, x] - expected).max() <= 1
    # nodata shows the image only
    np.testing.assert_array_equal(overlay[-1, 0], image[-1, 0])


def test_grey_image_is_shown_as_grey() -> None:
    _, mask = _scene()
    grey = np.full((40, 60, 1), 90, dtype=np.uint8)
    img = render_panels(grey, mask, NAMES)
    boxes = panel_boxes(40, 60)
    assert (_crop(img, boxes[0]) == 90).all()
    overlay = _crop(img, boxes[2]).astype(np.int16)
    expected = np.round(0.5 * np.array(palette(5)[2]) + 0.5 * 90)
    assert np.abs(overlay[20, 45] - expected).max() <= 1


def test_rgba_image_drops_alpha() -> None:
    image, mask = _scene()
    rgba = np.concatenate([image, np.full((40, 60, 1), 7, dtype=np.uint8)], axis=2)
    img = render_panels(rgba, mask, NAMES)
    np.testing.assert_array_equal(_crop(img, panel_boxes(40, 60)[0]), image)


def test_uint16_image_is_min_max_scaled() -> None:
    _, mask = _scene()
    image = np.zeros((40, 60, 3), dtype=np.uint16)
    image[:, 30:] = 4000
    image[:, 15:30] = 2000
    img = render_panels(image, mask, NAMES)
    shown = _crop(img, panel_boxes(40, 60)[0])
    assert (shown[:, :15] == 0).all()
    assert (shown[:, 15:30] == 128).all()  # round(2000 / 4000 * 255)
    assert (shown[:, 30:] == 255).all()


def test_multiband_float_image_shows_first_three_channels() -> None:
    _, mask = _scene()
    image = np.zeros((40, 60, 6), dtype=np.float32)
    image[..., 0] = 1.0
    image[..., 5] = 100.0  # ignored band, must not affect scaling
    img = render_panels(image, mask, NAMES)
    shown = _crop(img, panel_boxes(40, 60)[0])
    assert (shown[..., 0] == 255).all()
    assert (shown[..., 1:] == 0).all()


def test_large_image_is_downscaled_to_max_side() -> None:
    image = np.full((300, 1000, 3), 60, dtype=np.uint8)
    mask = np.zeros((300, 1000), dtype=np.uint8)
    mask[:, 500:] = 1
    img = render_panels(image, mask, NAMES, max_side_px=100)
    boxes = panel_boxes(300, 1000, max_side_px=100)
    assert [(b[2] - b[0], b[3] - b[1]) for b in boxes] == [(100, 30)] * 3
    assert img.width < 3 * 100 + 60
    mask_panel = _crop(img, boxes[1])
    assert tuple(mask_panel[15, 10]) == palette(5)[0]
    assert tuple(mask_panel[15, 90]) == palette(5)[1]
    assert set(map(tuple, mask_panel.reshape(-1, 3))) == {palette(5)[0], palette(5)[1]}
    assert (_crop(img, boxes[0]) == 60).all()


def test_legend_strip_is_capped_at_max_entries() -> None:
    names = [f"class_{i}" for i in range(40)]
    image = np.zeros((30, 20, 3), dtype=np.uint8)

    def legend_height(num_present: int) -> int:
        mask = (np.arange(30 * 20).reshape(30, 20) % num_present).astype(np.uint8)
        assert len(legend_entries(mask, names)) == num_present
        return render_panels(image, mask, names).height

    assert MAX_LEGEND_ENTRIES == 20
    assert legend_height(3) < legend_height(12) < legend_height(21)
    # above the cap only a '+N more' line is added, however many classes are hidden
    assert legend_height(21) == legend_height(22) == legend_height(40)


def test_bad_inputs_are_rejected() -> None:
    image, mask = _scene()
    with pytest.raises(ValueError, match="same height and width"):
        render_panels(image, mask[:10], NAMES)
    with pytest.raises(ValueError, match="alpha"):
        render_panels(image, mask, NAMES, alpha=1.5)
    with pytest.raises(ValueError, match="max_side_px"):
        render_panels(image, mask, NAMES, max_side_px=0)


def test_save_panels_round_trips_png() -> None:
    image, mask = _scene()
    img = render_panels(image, mask, NAMES)
    data = save_panels(img)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    reread = Image.open(io.BytesIO(data))
    assert reread.size == img.size
    np.testing.assert_array_equal(np.asarray(reread.convert("RGB")), np.asarray(img))
