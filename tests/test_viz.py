"""viz.py against oracles: a kept cell keeps its exact pixels, a pruned cell is
dimmed, the evidence box is outlined in its colour, scores land in their cells."""
import numpy as np
import pytest
import torch
from PIL import Image

from sparsevlm_exp import viz
from sparsevlm_exp.contracts import PruneEvent

ROWS, COLS, CELL = 4, 6, 16          # a 96 x 64 image, one 16 x 16 block of colour per token cell
W, H = COLS * CELL, ROWS * CELL


def cell_colour(row: int, col: int) -> tuple[int, int, int]:
    # distinct, saturated-ish colours away from grey, so dimming is visible in every channel
    return (40 + 35 * col, 230 - 45 * row, 60 + 20 * ((row + col) % 4))


def checker_image() -> Image.Image:
    pixels = np.zeros((H, W, 3), dtype=np.uint8)
    for r in range(ROWS):
        for c in range(COLS):
            pixels[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = cell_colour(r, c)
    return Image.fromarray(pixels)


def dimmed(colour):
    return tuple(round(v * viz.PRUNED_KEEP + viz.PRUNED_DARK * (1 - viz.PRUNED_KEEP)) for v in colour)


# Sequence layout: 3 text tokens, then the 24 visual tokens row by row.
VISUAL_INDEX = torch.arange(3, 3 + ROWS * COLS)
VISUAL_COORDS = torch.tensor([(0, r, c) for r in range(ROWS) for c in range(COLS)])
KEPT_CELLS = [(0, 0), (1, 2), (2, 5), (3, 3)]
EVIDENCE_BOX = (32, 16, 64, 48)       # covers cells rows 1-2, cols 2-3


def seq_index(row, col):
    return 3 + row * COLS + col


def one_event():
    scores = torch.arange(ROWS * COLS, dtype=torch.float32)          # score = position, easy to check
    kept = torch.tensor(sorted(seq_index(r, c) for r, c in KEPT_CELLS))
    return PruneEvent(layer=2, kept_index=kept[None], scores=scores[None], scored_index=VISUAL_INDEX[None])


def test_pixel_cells_follow_the_cell_rule():
    # 10 px wide, 3 columns: cells [0, 3.33), [3.33, 6.67), [6.67, 10)
    row_of, col_of = viz.pixel_cells((10, 4), (2, 3))
    assert col_of.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert row_of.tolist() == [0, 0, 1, 1]


def test_overlay_keeps_kept_cells_and_dims_pruned_ones():
    image = checker_image()
    kept_cells = np.zeros((ROWS, COLS), dtype=bool)
    for r, c in KEPT_CELLS:
        kept_cells[r, c] = True
    out = np.asarray(viz.overlay_kept_cells(image, (ROWS, COLS), kept_cells))
    original = np.asarray(image)
    hatch = viz.hatch_mask((W, H))
    for r in range(ROWS):
        for c in range(COLS):
            cell = (slice(r * CELL, (r + 1) * CELL), slice(c * CELL, (c + 1) * CELL))
            block = out[cell]
            if (r, c) in KEPT_CELLS:
                assert np.array_equal(block, original[cell])
            else:
                on_hatch = hatch[cell]
                assert on_hatch.any() and (~on_hatch).any()
                assert (block[on_hatch] == viz.HATCH_COLOR).all()
                assert (block[~on_hatch] == dimmed(cell_colour(r, c))).all()


@pytest.mark.parametrize("grey", [0, 60, 110, 128, 200, 255])
def test_pruned_cells_are_unmistakable_on_any_background(grey):
    """The old dimming toward grey 110 moved a grey background by about 10 levels. Now,
    whatever the background, at least a quarter of a pruned cell's pixels differ from
    the kept look by >= 64 grey levels (hatch lines on dark content, darkening on light)."""
    image = Image.new("RGB", (W, H), (grey, grey, grey))
    kept_cells = np.zeros((ROWS, COLS), dtype=bool)
    kept_cells[0, 0] = True
    out = np.asarray(viz.overlay_kept_cells(image, (ROWS, COLS), kept_cells)).astype(int)
    assert (out[:CELL, :CELL] == grey).all()                                # kept: untouched
    for r in range(ROWS):
        for c in range(COLS):
            if (r, c) == (0, 0):
                continue
            block = out[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL]
            far = np.abs(block - grey).max(axis=-1) >= 64
            assert far.mean() >= 0.25, (grey, r, c, far.mean())


def test_evidence_box_is_outlined_in_its_colour():
    out = np.asarray(viz.overlay_kept_cells(checker_image(), (ROWS, COLS), np.ones((ROWS, COLS), bool),
                                            boxes=[EVIDENCE_BOX]))
    x0, y0, x1, y1 = EVIDENCE_BOX
    for x, y in [(x0, y0 + 10), (x1 - 1, y0 + 10), (x0 + 10, y0), (x0 + 10, y1 - 1)]:
        assert tuple(out[y, x]) == viz.EVIDENCE_COLOR
    # inside and outside the outline the image is untouched (all cells kept here)
    assert tuple(out[y0 + 16, x0 + 16]) == cell_colour(2, 3)
    assert tuple(out[2, 2]) == cell_colour(0, 0)


def test_heatmap_puts_each_score_in_its_cell_and_leaves_unscored_blank():
    scores = np.full((ROWS, COLS), np.nan)
    scores[0, 0], scores[3, 5] = 0.0, 1.0
    out = np.asarray(viz.score_heatmap((W, H), (ROWS, COLS), scores, 0.0, 1.0))
    import matplotlib

    cmap = matplotlib.colormaps[viz.HEATMAP]
    assert tuple(out[CELL // 2, CELL // 2]) == tuple(round(v * 255) for v in cmap(0.0)[:3])
    assert tuple(out[H - 2, W - 2]) == tuple(round(v * 255) for v in cmap(1.0)[:3])
    assert tuple(out[CELL + 5, CELL + 5]) == viz.UNSCORED_COLOR


def colours_in(path) -> set:
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    return {tuple(p) for p in np.unique(pixels, axis=0).tolist()}


def test_picture_shows_kept_cells_as_they_are_and_pruned_cells_dimmed(tmp_path):
    pictures = viz.kept_token_pictures([checker_image()], [(ROWS, COLS)], VISUAL_INDEX, VISUAL_COORDS,
                                       [one_event()], [[EVIDENCE_BOX]], tmp_path, "sample7")
    assert list(pictures) == ["viz/sample7_layer2"]
    path = pictures["viz/sample7_layer2"]
    assert path.exists() and path.parent == tmp_path
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= 2 * W and im.height >= H
    colours = colours_in(path)
    for r in range(ROWS):
        for c in range(COLS):
            if (r, c) in KEPT_CELLS:
                assert cell_colour(r, c) in colours                        # shown unchanged
            else:
                assert cell_colour(r, c) not in colours                    # never shown undimmed
                assert dimmed(cell_colour(r, c)) in colours
    assert viz.EVIDENCE_COLOR in colours


def test_scores_map_back_through_scored_index(tmp_path):
    # A second cut scores only the survivors of the first: other cells stay blank.
    first = one_event()
    survivors = first.kept_index[0]                                   # 4 tokens
    second = PruneEvent(layer=5, kept_index=survivors[[0, 3]][None],
                        scores=torch.tensor([[0.9, 0.1, 0.2, 0.8]]), scored_index=survivors[None])
    pictures = viz.kept_token_pictures([checker_image()], [(ROWS, COLS)], VISUAL_INDEX, VISUAL_COORDS,
                                       [first, second], None, tmp_path, "s")
    assert sorted(pictures) == ["viz/s_layer2", "viz/s_layer5"]
    colours = colours_in(pictures["viz/s_layer5"])
    # kept at layer 5: cells (0, 0) and (3, 3); (1, 2) and (2, 5) were cut there
    assert cell_colour(0, 0) in colours and cell_colour(3, 3) in colours
    assert cell_colour(1, 2) not in colours and cell_colour(2, 5) not in colours
    assert viz.EVIDENCE_COLOR not in colours                          # no evidence given


def test_evidence_recall_in_the_title_matches_the_kept_cells(tmp_path, monkeypatch):
    titles = []
    real_compose = viz._compose

    def spy(*args):
        titles.append(args[6])
        return real_compose(*args)

    monkeypatch.setattr(viz, "_compose", spy)
    viz.kept_token_pictures([checker_image()], [(ROWS, COLS)], VISUAL_INDEX, VISUAL_COORDS,
                            [one_event()], [[EVIDENCE_BOX]], tmp_path, "s")
    # the box covers 4 cells (rows 1-2 x cols 2-3); of those only (1, 2) is kept
    assert titles == ["s: layer 2, kept 4/24 visual tokens, evidence recall 0.25"]


def test_large_images_are_shrunk_and_tiny_ones_grown():
    assert viz.display_size((1280, 960))[0] == (640, 480)
    assert viz.display_size((96, 64)) == ((288, 192), Image.Resampling.NEAREST)
    assert viz.display_size((400, 300))[0] == (400, 300)
