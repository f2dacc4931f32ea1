"""Pictures of what a pruner kept: per pruning layer, each image with its pruned
token cells darkened and hatched beside the heatmap of that layer's scores, evidence boxes drawn.

A visual token covers one cell of its image's token grid: cell (row, col) of a
(rows, cols) grid covers x in [col*W/cols, (col+1)*W/cols) and y in
[row*H/rows, (row+1)*H/rows) of the ORIGINAL image (the same cells that
metrics/evidence.py uses for evidence recall).

The pictures are composed with PIL, pixel for pixel: a kept cell shows the
image's own pixels unchanged, so a picture can be checked, not just looked at.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .metrics.evidence import evidence_recall, evidence_token_mask

# Pruned cells: darkened (this much of the pixel, the rest PRUNED_DARK) AND crossed by
# diagonal hatch lines in HATCH_COLOR. Darkening alone cannot mark a cell of an already
# dark image, and dimming toward mid-grey left grey backgrounds almost unchanged (about
# 10 levels); the hatch marks every pruned cell whatever its content, the darkening
# keeps it from reading as "kept" at a glance. Kept cells are never touched.
PRUNED_KEEP = 0.25
PRUNED_DARK = 20
HATCH_COLOR = (235, 235, 235)
HATCH_PERIODS = 16          # hatch lines along the image's short side
EVIDENCE_COLOR = (255, 0, 255)       # magenta: absent from the viridis heatmap and rare in photos
UNSCORED_COLOR = (255, 255, 255)     # heatmap cells this layer did not score (pruned earlier)
GRID_COLOR = (215, 215, 215)
HEATMAP = "viridis"
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (20, 20, 20)
PAD, GAP, COLORBAR_W = 12, 16, 16
SMALLEST_SIDE, LARGEST_SIDE = 256, 640     # images are shown at least / at most this large (long side)


# --------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------
def pixel_cells(size: tuple[int, int], grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(row of each pixel row [H], column of each pixel column [W]) in the token grid.

    Pixel x lies in cell column c iff c*W/cols <= x < (c+1)*W/cols, i.e. c = floor(x*cols/W),
    computed in integers so that cell borders are exact."""
    (w, h), (rows, cols) = size, grid
    return (np.arange(h) * rows) // h, (np.arange(w) * cols) // w


def cell_values(grid: tuple[int, int], coords: torch.LongTensor, values, fill) -> np.ndarray:
    """[rows, cols] array holding values[i] at the cell of coords[i] = (row, col); `fill` elsewhere."""
    rows, cols = grid
    out = np.full((rows, cols), fill, dtype=np.asarray(values).dtype if len(values) else float)
    for (r, c), v in zip(coords.tolist(), np.asarray(values).tolist()):
        out[r, c] = v
    return out


# --------------------------------------------------------------------------------------
# Panels (each the size of the original image)
# --------------------------------------------------------------------------------------
def overlay_kept_cells(image: Image.Image, grid: tuple[int, int], kept_cells: np.ndarray,
                       boxes=None) -> Image.Image:
    """The image with kept cells unchanged and pruned cells darkened and hatched;
    evidence boxes (x0, y0, x1, y1 in the image's pixels) outlined in EVIDENCE_COLOR.

    kept_cells: bool [rows, cols]."""
    rgb = np.asarray(image.convert("RGB"))
    row_of, col_of = pixel_cells(image.size, grid)
    kept_pixels = kept_cells[row_of[:, None], col_of[None, :]]                  # [H, W]
    pruned = (rgb.astype(np.float32) * PRUNED_KEEP + PRUNED_DARK * (1 - PRUNED_KEEP)).round().astype(np.uint8)
    pruned[hatch_mask(image.size)] = HATCH_COLOR
    out = Image.fromarray(np.where(kept_pixels[..., None], rgb, pruned))
    draw_boxes(out, boxes)
    return out


def hatch_mask(size: tuple[int, int]) -> np.ndarray:
    """bool [H, W]: the pixels on the diagonal hatch lines. The period scales with the
    image (HATCH_PERIODS lines along the short side, at least 6 px) and a line is a third
    of it wide (at least 2 px), so the hatch survives the resize to display size."""
    w, h = size
    period = max(6, round(min(w, h) / HATCH_PERIODS))
    width = max(2, round(period / 3))
    return ((np.arange(h)[:, None] + np.arange(w)[None, :]) % period) < width


def score_heatmap(size: tuple[int, int], grid: tuple[int, int], cell_scores: np.ndarray,
                  low: float, high: float, boxes=None) -> Image.Image:
    """An image-sized picture of the scores: each cell coloured by its score on a
    shared [low, high] scale; cells without a score (NaN) left blank."""
    import matplotlib

    cmap = matplotlib.colormaps[HEATMAP]
    unit = np.clip((cell_scores - low) / (high - low), 0, 1) if high > low else np.full(cell_scores.shape, 0.5)
    colours = (cmap(np.nan_to_num(unit))[..., :3] * 255).round().astype(np.uint8)   # [rows, cols, 3]
    colours[np.isnan(cell_scores)] = UNSCORED_COLOR
    row_of, col_of = pixel_cells(size, grid)
    out = Image.fromarray(colours[row_of[:, None], col_of[None, :]])
    draw_boxes(out, boxes)
    return out


def draw_boxes(image: Image.Image, boxes) -> None:
    if not boxes:
        return
    draw = ImageDraw.Draw(image)
    width = max(2, round(min(image.size) / 120))
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=EVIDENCE_COLOR, width=width)


def draw_cell_grid(image: Image.Image, grid: tuple[int, int]) -> None:
    """Thin lines between cells, so blank (unscored) cells still read as cells."""
    (w, h), (rows, cols) = image.size, grid
    draw = ImageDraw.Draw(image)
    for c in range(1, cols):
        draw.line([(c * w // cols, 0), (c * w // cols, h)], fill=GRID_COLOR)
    for r in range(1, rows):
        draw.line([(0, r * h // rows), (w, r * h // rows)], fill=GRID_COLOR)


def display_size(size: tuple[int, int]) -> tuple[tuple[int, int], Image.Resampling]:
    """Size to show an image at and how to resample: small images grow by a whole
    factor with NEAREST (cells stay crisp, colours exact), large ones shrink."""
    w, h = size
    long_side = max(w, h)
    if long_side < SMALLEST_SIDE:
        factor = -(-SMALLEST_SIDE // long_side)
        return (w * factor, h * factor), Image.Resampling.NEAREST
    if long_side > LARGEST_SIDE:
        scale = LARGEST_SIDE / long_side
        return (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS
    return (w, h), Image.Resampling.NEAREST


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:                  # Pillow without FreeType sizes
        return ImageFont.load_default()


def colorbar(height: int) -> Image.Image:
    import matplotlib

    ramp = np.linspace(1, 0, height)[:, None].repeat(COLORBAR_W, axis=1)                 # high at the top
    bar = (matplotlib.colormaps[HEATMAP](ramp)[..., :3] * 255).round().astype(np.uint8)
    return Image.fromarray(bar)


# --------------------------------------------------------------------------------------
# One picture per pruning layer
# --------------------------------------------------------------------------------------
def kept_token_pictures(sample_images: list[Image.Image], image_grids: list[tuple[int, int]],
                        visual_index: torch.LongTensor, visual_coords: torch.LongTensor, events: list,
                        evidence: list[list] | None, out_dir: Path, prefix: str) -> dict[str, Path]:
    """Write one PNG per pruning event and return {f"viz/{prefix}_layer{K}": path}.

    visual_index: [N] original sequence indices of the visual tokens (sorted), as in
    EncodedRequest (batch 1); visual_coords: [N, 3 or 4] (image, row, col[, frame]) - a
    clip must first become a strip with clip_strips; events:
    PruneEvents of that request (kept_index / scores / scored_index of shape [1, n]);
    evidence: boxes per image in original pixels, or None.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    visual_index = visual_index.detach().cpu().reshape(-1)
    visual_coords = visual_coords.detach().cpu()
    visual_coords = visual_coords.reshape(-1, visual_coords.shape[-1])[:, :3]       # (image, row, col)
    n_visual = int(visual_index.numel())
    evidence_index = None
    if evidence is not None:
        mask = evidence_token_mask(evidence, [im.size for im in sample_images], image_grids, visual_coords)
        evidence_index = visual_index[mask]

    pictures = {}
    for event in events:
        kept_index = _row(event.kept_index)
        kept = torch.isin(visual_index, kept_index)                                  # [N]
        scores = torch.full((n_visual,), float("nan"))
        scored_index, scored_values = _row(event.scored_index), _row(event.scores).float()
        position = torch.searchsorted(visual_index, scored_index).clamp(max=max(n_visual - 1, 0))
        found = visual_index[position] == scored_index      # recycled (merged) tokens have no cell
        scores[position[found]] = scored_values[found]

        title = f"{prefix}: layer {event.layer}, kept {int(kept.sum())}/{n_visual} visual tokens"
        if evidence_index is not None:
            recall = evidence_recall(evidence_index, kept_index)
            title += ", evidence recall " + ("n/a (no evidence tokens)" if recall is None else f"{recall:.2f}")
        picture = _compose(sample_images, image_grids, visual_coords, kept, scores, evidence, title, event.layer)
        path = out_dir / f"{_file_name(prefix)}_layer{event.layer}.png"
        picture.save(path)
        pictures[f"viz/{prefix}_layer{event.layer}"] = path
    return pictures


def clip_strips(videos: list, images: list[Image.Image], image_grids: list[tuple[int, int]],
                visual_coords: torch.LongTensor) -> tuple[list[Image.Image], list[tuple[int, int]], torch.LongTensor]:
    """Pictures for video: each clip becomes one strip of frames side by side (the first
    frame of each temporal token), so kept_token_pictures draws its kept cells frame by
    frame. Clips come first in the prompt (numbered 0..V-1), then the images.

    videos: contracts.Video list; images: the sample's images; image_grids: (rows, cols)
    per clip / image (EncodedRequest.image_grids); visual_coords: [N, 4] (image, row,
    col, frame). Returns (pictures in prompt order, their grids with a clip's columns
    times its temporal tokens, [N, 3] coords with col = frame * cols + col)."""
    coords = visual_coords.detach().cpu().reshape(-1, visual_coords.shape[-1])
    if not videos:
        return list(images), list(image_grids), coords[:, :3]
    coords = coords.clone()
    pictures, grids = [], []
    for clip_no, video in enumerate(videos):
        rows, cols = image_grids[clip_no]
        on_clip = coords[:, 0] == clip_no
        t = int(coords[on_clip, 3].max()) + 1 if on_clip.any() else 1
        frames = video.frames
        shown = [Image.fromarray(frames[min(round(j * len(frames) / t), len(frames) - 1)]) for j in range(t)]
        strip = Image.new("RGB", (sum(f.width for f in shown), shown[0].height))
        for j, frame in enumerate(shown):
            strip.paste(frame, (j * shown[0].width, 0))
        pictures.append(strip)
        grids.append((rows, cols * t))
        coords[on_clip, 2] = coords[on_clip, 3] * cols + coords[on_clip, 2]
    pictures += list(images)
    grids += list(image_grids[len(videos):])
    return pictures, grids, coords[:, :3]


def _row(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return t[0] if t.dim() == 2 else t


def _file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text))


def _compose(images, grids, coords, kept, scores, evidence, title, layer) -> Image.Image:
    """Title, a legend line, then per image: [kept/pruned | heatmap] and a colour bar."""
    scored = scores[~torch.isnan(scores)]
    low, high = (float(scored.min()), float(scored.max())) if scored.numel() else (0.0, 1.0)
    title_font, text_font = _font(17), _font(13)

    rows = []      # (caption, overlay, heatmap) shown at display size
    for image_no, (image, grid) in enumerate(zip(images, grids)):
        on_image = coords[:, 0] == image_no
        cell_rc = coords[on_image][:, 1:]
        kept_cells = cell_values(grid, cell_rc, kept[on_image].numpy(), False).astype(bool)
        cell_scores = cell_values(grid, cell_rc, scores[on_image].numpy(), np.nan)
        boxes = evidence[image_no] if evidence is not None and image_no < len(evidence) else None
        size, resample = display_size(image.size)
        overlay = overlay_kept_cells(image, grid, kept_cells, boxes).resize(size, resample)
        heatmap = score_heatmap(image.size, grid, cell_scores, low, high, boxes).resize(size, Image.Resampling.NEAREST)
        draw_cell_grid(heatmap, grid)
        caption = f"image {image_no} ({grid[0]}x{grid[1]} tokens)" if len(images) > 1 else ""
        rows.append((caption, overlay, heatmap))

    legend = (f"left: kept cells as in the image, pruned cells darkened + hatched | right: layer {layer} scores "
              f"(blank = not scored here)" + (" | magenta: evidence boxes" if evidence is not None else ""))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(max(measure.textlength(f"{v:.3g}", font=text_font) for v in (low, high))) + 8
    panel_w = max(o.width for _, o, _ in rows)
    width = max(PAD + panel_w + GAP + panel_w + GAP + COLORBAR_W + 4 + label_w + PAD,
                PAD * 2 + int(measure.textlength(title, font=title_font)),
                PAD * 2 + int(measure.textlength(legend, font=text_font)))
    header_h = PAD + 22 + 18 + 6
    caption_h = 18
    height = header_h + sum(caption_h + o.height + GAP for _, o, _ in rows) + PAD

    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, PAD), title, fill=TEXT_COLOR, font=title_font)
    draw.text((PAD, PAD + 24), legend, fill=TEXT_COLOR, font=text_font)
    y = header_h
    for caption, overlay, heatmap in rows:
        draw.text((PAD, y), caption or "kept / pruned", fill=TEXT_COLOR, font=text_font)
        x_heat = PAD + panel_w + GAP
        draw.text((x_heat, y), f"layer {layer} scores", fill=TEXT_COLOR, font=text_font)
        y += caption_h
        canvas.paste(overlay, (PAD, y))
        canvas.paste(heatmap, (x_heat, y))
        x_bar = x_heat + panel_w + GAP
        canvas.paste(colorbar(overlay.height), (x_bar, y))
        draw.text((x_bar + COLORBAR_W + 4, y), f"{high:.3g}", fill=TEXT_COLOR, font=text_font)
        draw.text((x_bar + COLORBAR_W + 4, y + overlay.height - 14), f"{low:.3g}", fill=TEXT_COLOR, font=text_font)
        y += overlay.height + GAP
    return canvas
