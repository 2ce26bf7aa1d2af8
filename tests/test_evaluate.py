"""Sample grids and saved samples of an evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.utils import numpy_to_pil
from PIL import Image

from tpgrpo import evaluate
from tpgrpo.evaluate import EvalResult, make_grid, save_grid, save_images

CAPTIONS = ["a red circle", "two blue squares on a white background", "a green triangle", "one yellow square", "x"]
PAD, LINE = 4, 16


def _images(n: int = 5, side: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(0))


def _result(n: int = 5) -> EvalResult:
    images = _images(n)
    scores = torch.linspace(0, 1, 20)  # more prompts evaluated than shown
    return EvalResult(reward=0.5, details={}, scores=scores, images=images, prompts=CAPTIONS[:n])


def test_grid_size_tiles_and_text_lines():
    # 32 px images upscaled 6x to 192 px; 4 px padding around each cell; 3 caption lines of 16 px
    # (+ 1 score line when scores are given); 3 columns, so 2 rows for 5 images.
    plain = make_grid(_images(), CAPTIONS, columns=3)
    scored = make_grid(_images(), CAPTIONS, scores=[0.0, 0.25, 0.5, 0.75, 1.0], columns=3)
    assert plain.size == (3 * (192 + 2 * PAD), 2 * (192 + 3 * LINE + 2 * PAD))
    assert scored.size == (3 * (192 + 2 * PAD), 2 * (192 + 4 * LINE + 2 * PAD))
    assert make_grid(_images(2, 64), CAPTIONS[:2]).size == (2 * (192 + 2 * PAD), 192 + 3 * LINE + 2 * PAD)


def test_grid_tile_is_the_upscaled_image():
    images = _images(1)
    grid = np.asarray(make_grid(images, ["a"], scores=[1.0]))
    tile = grid[PAD : PAD + 192, PAD : PAD + 192]
    expected = (images[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(tile[::6, ::6], expected) and np.array_equal(tile[5::6, 5::6], expected)


def test_score_is_drawn_in_its_own_band():
    """Two score lists that differ in image 1 only: the grids differ in image 1's score line and
    nowhere else; its caption lines are the same."""
    a = np.asarray(make_grid(_images(), CAPTIONS, scores=[0.0, 0.25, 0.5, 0.75, 1.0], columns=3))
    b = np.asarray(make_grid(_images(), CAPTIONS, scores=[0.0, 1.0, 0.5, 0.75, 1.0], columns=3))
    rows, cols = np.nonzero((a != b).any(axis=2))
    assert rows.size > 0
    cell_w, band = 192 + 2 * PAD, PAD + 192 + 1
    assert cols.min() >= cell_w and cols.max() < 2 * cell_w  # column 1 of row 0
    assert rows.min() >= band and rows.max() < band + LINE
    # The score line pushes the caption down by one line, text unchanged.
    plain = np.asarray(make_grid(_images(), CAPTIONS, columns=3))
    captions = slice(band, band + 3 * LINE)
    moved = slice(band + LINE, band + 4 * LINE)
    assert np.array_equal(plain[captions, :cell_w], a[moved, :cell_w])


def test_save_grid_captions_the_shown_samples_with_their_scores(tmp_path):
    result = _result()
    saved = np.asarray(Image.open(save_grid(result, tmp_path / "grid.png", columns=3)))
    expected = np.asarray(make_grid(result.images, result.prompts, scores=result.scores[:5], columns=3))
    assert np.array_equal(saved, expected)
    assert not np.array_equal(saved, np.asarray(make_grid(result.images, result.prompts, scores=result.scores[5:10], columns=3)))
    assert not (tmp_path / ".grid.png.tmp").exists()


def test_grid_without_dejavu_uses_pillows_font(monkeypatch):
    monkeypatch.setitem(evaluate._FONT_FILES, "regular", "no-such-font.ttf")
    monkeypatch.setitem(evaluate._FONT_FILES, "bold", "no-such-font.ttf")
    grid = make_grid(_images(2), CAPTIONS[:2], scores=[0.5, 1.0])
    assert grid.size == (2 * (192 + 2 * PAD), 192 + 4 * LINE + 2 * PAD)
    band = np.asarray(grid)[PAD + 192 + 1 : PAD + 192 + 1 + LINE]
    assert (band < 128).any()  # text was drawn


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"images": torch.rand(2, 32, 32), "captions": ["a", "b"]}, r"expected images \[n, 3, H, W\], got shape \(2, 32, 32\)"),
        ({"images": torch.rand(2, 1, 8, 8), "captions": ["a", "b"]}, r"expected images \[n, 3, H, W\]"),
        ({"images": torch.rand(0, 3, 8, 8), "captions": []}, r"expected as many captions as images \(>= 1\), got 0 and 0"),
        ({"images": torch.rand(2, 3, 8, 8), "captions": ["a"]}, r"expected as many captions as images \(>= 1\), got 2 and 1"),
        ({"images": torch.rand(2, 3, 8, 8), "captions": ["a", "b"], "scores": [1.0]}, r"expected one score per image \(2\), got 1"),
        ({"images": torch.rand(2, 3, 8, 8), "captions": ["a", "b"], "columns": 0}, "expected columns, caption_lines and scale >= 1"),
        ({"images": torch.rand(2, 3, 8, 8), "captions": ["a", "b"], "scale": 0}, "expected columns, caption_lines and scale >= 1"),
    ],
)
def test_grid_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=f"^make_grid: {message}"):
        make_grid(**kwargs)


def test_save_images_writes_samples_as_diffusers_quantises_them(tmp_path):
    result = _result(3)
    (tmp_path / "eval_images").mkdir()
    (tmp_path / "eval_images" / "07.png").write_bytes(b"stale")
    paths = save_images(result, tmp_path / "eval_images")
    assert [p.name for p in paths] == ["00.png", "01.png", "02.png"]
    assert sorted(p.name for p in (tmp_path / "eval_images").iterdir()) == ["00.png", "01.png", "02.png"]
    as_diffusers = numpy_to_pil(result.images.permute(0, 2, 3, 1).numpy())  # a pipeline's output_type="pil"
    for path, image in zip(paths, as_diffusers):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))
