"""Overlay panels for looking at masks: image, colourised mask and their blend, with a legend.

Pure numpy + Pillow (no matplotlib). Colours follow the PASCAL VOC colour map, so class 0 is black,
class 1 dark red, class 2 dark green and so on; the same bit-interleaving scheme carries on past 256
classes. Mask value 255 is nodata whenever a model has at most 255 classes (see
``docs/architecture.md``): it is drawn light grey in the mask panel and left out of the overlay.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "MAX_LEGEND_ENTRIES",
    "NODATA_RGB",
    "NODATA_VALUE",
    "PANEL_TITLES",
    "colorize",
    "flat_palette",
    "legend_entries",
    "palette",
    "panel_boxes",
    "render_panels",
    "save_panels",
]

NODATA_VALUE = 255
NODATA_RGB: tuple[int, int, int] = (224, 224, 224)
PANEL_TITLES = ("image", "mask", "overlay")
MAX_LEGEND_ENTRIES = 20

# The VOC scheme spreads 3 index bits per step over r, g, b; 8 steps use 24 bits, so colours are
# distinct for the first 2**24 classes and repeat after that.
_VOC_PERIOD = 1 << 24

_MARGIN_PX = 8
_GAP_PX = 8
_TITLE_GAP_PX = 4
_LEGEND_GAP_PX = 10
_SWATCH_PX = 12
_SWATCH_TEXT_GAP_PX = 5
_LEGEND_COLUMN_GAP_PX = 16
_LEGEND_ROW_GAP_PX = 4
_MAX_NAME_CHARS = 32
_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)
_SWATCH_OUTLINE = (96, 96, 96)
# rows of a non-uint8 image converted at a time, to bound the float temporaries on big scenes
_SCALE_CHUNK_ROWS = 1024

_Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def _voc_colour(index: int) -> tuple[int, int, int]:
    c = index % _VOC_PERIOD
    r = g = b = 0
    for step in range(8):
        shift = 7 - step
        r |= (c & 1) << shift
        g |= ((c >> 1) & 1) << shift
        b |= ((c >> 2) & 1) << shift
        c >>= 3
    return r, g, b


def _has_nodata(num_classes: int) -> bool:
    """Whether mask value 255 means nodata (it is a real class above 255 classes)."""
    return num_classes <= NODATA_VALUE


def palette(num_classes: int) -> list[tuple[int, int, int]]:
    """RGB colour per class index: the PASCAL VOC colour map, extended past 256 classes.

    Returns ``max(num_classes, 256)`` entries so that any uint8 mask value can be looked up.
    Entry 255 is :data:`NODATA_RGB` when ``num_classes <= 255``; otherwise 255 is a class and gets
    its VOC colour. The first 2**24 entries are pairwise distinct, after that they cycle.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    colours = [_voc_colour(i) for i in range(max(num_classes, 256))]
    if _has_nodata(num_classes):
        colours[NODATA_VALUE] = NODATA_RGB
    return colours


def flat_palette(num_classes: int) -> list[int]:
    """768 ints ``[r0, g0, b0, r1, ...]`` for ``Image.putpalette`` on a ``P`` mode mask.

    Entry 255 is always :data:`NODATA_RGB`: a ``P`` image holds uint8 values, so masks written
    that way have at most 255 classes and 255 is nodata.
    """
    colours = palette(num_classes)[:256]
    colours[NODATA_VALUE] = NODATA_RGB
    return [channel for colour in colours for channel in colour]


def _lookup_table(num_classes: int, max_value: int) -> NDArray[np.uint8]:
    """(max(num_classes, 256, max_value + 1), 3) uint8; values past the classes keep the scheme."""
    colours = palette(max(num_classes, max_value + 1))
    if _has_nodata(num_classes):
        colours[NODATA_VALUE] = NODATA_RGB
    return np.asarray(colours, dtype=np.uint8)


def _check_mask(mask: np.ndarray) -> None:
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"mask must hold integer class indices, got dtype {mask.dtype}")
    if mask.size and np.issubdtype(mask.dtype, np.signedinteger) and int(mask.min()) < 0:
        raise ValueError("mask holds negative values; class indices start at 0")


def colorize(mask: np.ndarray, num_classes: int) -> NDArray[np.uint8]:
    """``(H, W)`` uint8/uint16 class indices -> ``(H, W, 3)`` uint8 RGB from :func:`palette`.

    Nodata (255, when ``num_classes <= 255``) becomes :data:`NODATA_RGB`. Values at or above
    ``num_classes`` are not an error here: they get the colour the scheme gives that index.
    """
    _check_mask(mask)
    max_value = int(mask.max()) if mask.size else 0
    return _lookup_table(num_classes, max_value)[mask]


def legend_entries(mask: np.ndarray, class_names: Sequence[str]) -> list[tuple[int, str, float]]:
    """Classes present in an ``(H, W)`` mask as ``(class index, name, percent of all pixels)``.

    Sorted by pixel count, largest first (ties by class index). Nodata pixels (255 when there are
    at most 255 class names) are not a class and are left out, but they count in the total, so the
    percentages sum to 100 minus the nodata share. Indices without a name are called ``class N``.
    """
    _check_mask(mask)
    if mask.size == 0:
        return []
    counts = np.bincount(mask.ravel().astype(np.intp, copy=False))
    if _has_nodata(len(class_names)) and counts.size > NODATA_VALUE:
        counts[NODATA_VALUE] = 0
    present = np.flatnonzero(counts)
    order = present[np.lexsort((present, -counts[present]))]
    total = float(mask.size)
    return [
        (int(i), _class_name(int(i), class_names), 100.0 * float(counts[i]) / total) for i in order
    ]


def _class_name(index: int, class_names: Sequence[str]) -> str:
    return class_names[index] if index < len(class_names) else f"class {index}"


@dataclass(frozen=True)
class _Layout:
    panel_w: int
    panel_h: int
    cell_w: int
    title_h: int
    panels_top: int

    def box(self, panel: int) -> tuple[int, int, int, int]:
        left = _MARGIN_PX + panel * (self.cell_w + _GAP_PX)
        return left, self.panels_top, left + self.panel_w, self.panels_top + self.panel_h

    @property
    def panels_width(self) -> int:
        return 2 * _MARGIN_PX + 3 * self.cell_w + 2 * _GAP_PX


def _font() -> _Font:
    return ImageFont.load_default()


def _text_size(font: _Font, text: str) -> tuple[int, int]:
    left, _top, right, bottom = font.getbbox(text)
    return int(np.ceil(right - left)), int(np.ceil(bottom))


def _scaled_size(height: int, width: int, max_side_px: int) -> tuple[int, int]:
    """(h, w) with the longer side at most ``max_side_px``; never upscales."""
    scale = min(1.0, max_side_px / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _layout(height: int, width: int, max_side_px: int, font: _Font) -> _Layout:
    panel_h, panel_w = _scaled_size(height, width, max_side_px)
    title_w = max(_text_size(font, title)[0] for title in PANEL_TITLES)
    title_h = max(_text_size(font, title)[1] for title in PANEL_TITLES)
    return _Layout(
        panel_w=panel_w,
        panel_h=panel_h,
        cell_w=max(panel_w, title_w),
        title_h=title_h,
        panels_top=_MARGIN_PX + title_h + _TITLE_GAP_PX,
    )


def panel_boxes(height: int, width: int, max_side_px: int = 512) -> list[tuple[int, int, int, int]]:
    """``(left, top, right, bottom)`` of the image, mask and overlay panels in the canvas that
    :func:`render_panels` draws for an ``(height, width)`` image; right and bottom exclusive."""
    if height < 1 or width < 1:
        raise ValueError(f"image must be at least 1x1, got {height}x{width}")
    _check_max_side(max_side_px)
    layout = _layout(height, width, max_side_px, _font())
    return [layout.box(panel) for panel in range(len(PANEL_TITLES))]


def _check_max_side(max_side_px: int) -> None:
    if max_side_px < 1:
        raise ValueError(f"max_side_px must be >= 1, got {max_side_px}")


def _display_rgb(image: np.ndarray) -> NDArray[np.uint8]:
    """``(H, W)`` or ``(H, W, C)`` any dtype -> ``(H, W, 3)`` uint8 for display.

    C = 1 (or 2, grey + alpha) is grey, C >= 3 keeps the first three channels (alpha dropped).
    Non-uint8 images are min-max scaled over the kept channels; NaN shows as black.
    """
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] < 1:
        raise ValueError(f"image must be (H, W, C), got shape {image.shape}")
    channels = image[:, :, :1] if image.shape[2] < 3 else image[:, :, :3]
    if channels.dtype != np.uint8:
        channels = _minmax_uint8(channels)
    if channels.shape[2] == 1:
        channels = np.repeat(channels, 3, axis=2)
    return np.ascontiguousarray(channels)


def _minmax_uint8(channels: np.ndarray) -> NDArray[np.uint8]:
    if channels.dtype == np.bool_:
        return channels.astype(np.uint8) * np.uint8(255)
    out = np.zeros(channels.shape, dtype=np.uint8)
    if channels.size == 0:
        return out
    finite = np.isfinite(channels) if np.issubdtype(channels.dtype, np.floating) else None
    if finite is not None and not finite.any():
        return out
    values = channels[finite] if finite is not None else channels
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return out
    scale = 255.0 / (hi - lo)
    for start in range(0, channels.shape[0], _SCALE_CHUNK_ROWS):
        chunk = channels[start : start + _SCALE_CHUNK_ROWS].astype(np.float64)
        scaled = np.rint((chunk - lo) * scale)
        out[start : start + _SCALE_CHUNK_ROWS] = np.nan_to_num(scaled, nan=0.0).clip(0, 255)
    return out


def _nearest_resize(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resample of an (H, W) mask, sampling pixel centres like PIL's NEAREST."""
    src_h, src_w = mask.shape
    if (src_h, src_w) == (height, width):
        return mask
    rows = ((np.arange(height) + 0.5) * src_h / height).astype(np.intp)
    cols = ((np.arange(width) + 0.5) * src_w / width).astype(np.intp)
    return mask[np.minimum(rows, src_h - 1)[:, None], np.minimum(cols, src_w - 1)[None, :]]


def _blend(
    rgb: NDArray[np.uint8], colours: NDArray[np.uint8], nodata: NDArray[np.bool_], alpha: float
) -> NDArray[np.uint8]:
    """``round(alpha * colour + (1 - alpha) * image)`` per pixel; nodata pixels keep the image."""
    mixed = np.rint(alpha * colours.astype(np.float32) + (1.0 - alpha) * rgb.astype(np.float32))
    blended = mixed.clip(0, 255).astype(np.uint8)
    blended[nodata] = rgb[nodata]
    return blended


def _percent_text(percent: float) -> str:
    return "<0.1%" if 0.0 < percent < 0.05 else f"{percent:.1f}%"


def _short(name: str) -> str:
    return name if len(name) <= _MAX_NAME_CHARS else name[: _MAX_NAME_CHARS - 3] + "..."


@dataclass(frozen=True)
class _LegendItem:
    colour: tuple[int, int, int] | None
    text: str


def _legend_items(
    mask: np.ndarray, class_names: Sequence[str], colours: NDArray[np.uint8]
) -> list[_LegendItem]:
    entries = legend_entries(mask, class_names)
    items = []
    for index, name, percent in entries[:MAX_LEGEND_ENTRIES]:
        r, g, b = (int(v) for v in colours[index])
        items.append(_LegendItem((r, g, b), f"{index}: {_short(name)}  {_percent_text(percent)}"))
    hidden = entries[MAX_LEGEND_ENTRIES:]
    if hidden:
        hidden_percent = sum(percent for _, _, percent in hidden)
        items.append(_LegendItem(None, f"+{len(hidden)} more  {_percent_text(hidden_percent)}"))
    if _has_nodata(len(class_names)):
        nodata_count = int(np.count_nonzero(mask == NODATA_VALUE))
        if nodata_count:
            percent = 100.0 * nodata_count / mask.size
            items.append(_LegendItem(NODATA_RGB, f"nodata  {_percent_text(percent)}"))
    if not items:
        items.append(_LegendItem(None, "no classes present"))
    return items


def render_panels(
    image: np.ndarray,
    mask: np.ndarray,
    class_names: Sequence[str],
    alpha: float = 0.5,
    max_side_px: int = 512,
) -> Image.Image:
    """Image, colourised mask and overlay side by side, titled, with a legend strip below.

    ``image`` is ``(H, W, C)`` (or ``(H, W)``): uint8 is shown as is, any other dtype is min-max
    scaled to uint8; C = 1 is grey, C = 3 RGB, C = 4 RGBA (alpha dropped), C > 4 shows the first
    three channels. ``mask`` is ``(H, W)`` uint8/uint16 class indices, 255 = nodata when there are
    at most 255 ``class_names``. Each panel is downscaled so its longer side is at most
    ``max_side_px`` (the mask with nearest neighbour). The overlay is
    ``round(alpha * colour + (1 - alpha) * image)``; nodata pixels show the image only. The legend
    lists the classes present (swatch, index, name, percent of all pixels) by pixel count, the
    first :data:`MAX_LEGEND_ENTRIES` of them and then ``+N more``, and the nodata share if any.
    Returns an RGB image; the panel positions are :func:`panel_boxes`.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1], got {alpha}")
    _check_max_side(max_side_px)
    _check_mask(mask)
    rgb_full = _display_rgb(image)
    if rgb_full.shape[:2] != mask.shape:
        raise ValueError(
            f"image is {rgb_full.shape[0]}x{rgb_full.shape[1]} but mask is "
            f"{mask.shape[0]}x{mask.shape[1]}; they must have the same height and width"
        )
    if mask.size == 0:
        raise ValueError("image and mask are empty (0 pixels)")

    font = _font()
    layout = _layout(mask.shape[0], mask.shape[1], max_side_px, font)
    num_classes = len(class_names)
    table = _lookup_table(max(num_classes, 1), int(mask.max()))

    size_wh = (layout.panel_w, layout.panel_h)
    image_panel = Image.fromarray(rgb_full)
    if image_panel.size != size_wh:
        image_panel = image_panel.resize(size_wh, Image.Resampling.BILINEAR)
    rgb = np.asarray(image_panel, dtype=np.uint8)
    small_mask = _nearest_resize(mask, layout.panel_h, layout.panel_w)
    mask_rgb = table[small_mask]
    if _has_nodata(num_classes):
        nodata = small_mask == NODATA_VALUE
    else:
        nodata = np.zeros(small_mask.shape, dtype=np.bool_)
    overlay_rgb = _blend(rgb, mask_rgb, nodata, alpha)

    items = _legend_items(mask, class_names, table)
    line_h = max(_SWATCH_PX, max(_text_size(font, item.text)[1] for item in items))
    item_w = max(_SWATCH_PX + _SWATCH_TEXT_GAP_PX + _text_size(font, it.text)[0] for it in items)
    column_w = item_w + _LEGEND_COLUMN_GAP_PX
    width = max(layout.panels_width, 2 * _MARGIN_PX + item_w)
    columns = max(1, (width - 2 * _MARGIN_PX + _LEGEND_COLUMN_GAP_PX) // column_w)
    rows = -(-len(items) // columns)
    legend_top = layout.panels_top + layout.panel_h + _LEGEND_GAP_PX
    height = legend_top + rows * line_h + (rows - 1) * _LEGEND_ROW_GAP_PX + _MARGIN_PX

    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    panels = (rgb, mask_rgb, overlay_rgb)
    for index, (title, pixels) in enumerate(zip(PANEL_TITLES, panels, strict=True)):
        left, top, _, _ = layout.box(index)
        draw.text((left, _MARGIN_PX), title, fill=_TEXT, font=font)
        canvas.paste(Image.fromarray(pixels), (left, top))

    for position, item in enumerate(items):
        row, column = divmod(position, columns)
        x = _MARGIN_PX + column * column_w
        y = legend_top + row * (line_h + _LEGEND_ROW_GAP_PX)
        if item.colour is not None:
            swatch_top = y + (line_h - _SWATCH_PX) // 2
            draw.rectangle(
                (x, swatch_top, x + _SWATCH_PX - 1, swatch_top + _SWATCH_PX - 1),
                fill=item.colour,
                outline=_SWATCH_OUTLINE,
            )
        draw.text((x + _SWATCH_PX + _SWATCH_TEXT_GAP_PX, y), item.text, fill=_TEXT, font=font)
    return canvas


def save_panels(img: Image.Image) -> bytes:
    """PNG bytes of a rendered panel image."""
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()
