"""fast_unet.data: 16-bit images, files the image folder skips (named), grids in the extension's format."""
import os
import threading

import pytest
import torch
from PIL import Image

from fast_unet import data
from fast_unet.files import FileError


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    im = Image.new("I;16", (8, 8), 32768)
    im.putpixel((0, 0), 65535)
    im.putpixel((1, 0), 0)
    im.save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    x = data.load_image(tmp_path / "g16.png", 8)
    assert x.dtype == torch.uint8 and x.shape == (3, 8, 8)
    assert x[:, 4, 4].tolist() == [128, 128, 128]  # mid-gray, not white
    assert x[:, 0, 0].tolist() == [255] * 3 and x[:, 0, 1].tolist() == [0] * 3


def test_8bit_images_unchanged(tmp_path):
    Image.new("RGB", (8, 8), (10, 128, 250)).save(tmp_path / "c.png")
    Image.new("L", (8, 8), 77).save(tmp_path / "l.png")
    assert data.load_image(tmp_path / "c.png", 8)[:, 3, 3].tolist() == [10, 128, 250]
    assert data.load_image(tmp_path / "l.png", 8)[:, 3, 3].tolist() == [77] * 3


def test_bomb_fifo_and_non_images_are_skipped_and_named(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # over 2x this, Pillow raises DecompressionBombError
    for i in range(2):
        Image.new("RGB", (16, 16), (50 * i, 100, 200)).save(tmp_path / f"ok{i}.png")
    Image.new("RGB", (50, 50)).save(tmp_path / "bomb.png")
    os.mkfifo(tmp_path / "pipe.png")  # opening it would wait for a writer forever
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "z1.txt").write_text("x")
    result = {}
    worker = threading.Thread(target=lambda: result.update(f=data.ImageFolder(str(tmp_path), 16)), daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "ImageFolder blocked (on the FIFO?)"
    folder = result["f"]
    assert len(folder) == 2 and folder.skipped == 4
    reasons = dict(folder.skipped_files)
    assert "decompression-bomb" in reasons["bomb.png"]
    assert reasons["pipe.png"] == "not a regular file"
    assert reasons["notes.txt"] == "not an image"
    summary = folder.skip_summary()
    assert summary.startswith("bomb.png (") and "notes.txt (not an image)" in summary
    assert "pipe.png (not a regular file)" in summary and summary.endswith("and 1 more")


def test_no_readable_image_names_the_skipped(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no readable image \(1 file\(s\), 1 skipped: a.txt \(not an image\)\)"):
        data.ImageFolder(str(tmp_path), 16)


def test_grid_format_follows_the_extension(tmp_path):
    imgs = torch.randint(0, 255, (3, 3, 8, 8), dtype=torch.uint8)
    for name, fmt in (("g.png", "PNG"), ("g.jpg", "JPEG"), ("g.jpeg", "JPEG"), ("g.webp", "WEBP")):
        data.save_grid(imgs, str(tmp_path / name))
        with Image.open(tmp_path / name) as im:
            assert im.format == fmt and im.size == (2 * 10 + 2, 2 * 10 + 2)
    for bad in ("g.xyz", "grid"):
        with pytest.raises(FileError, match="image extension"):
            data.save_grid(imgs, str(tmp_path / bad))
    assert sorted(os.listdir(tmp_path)) == ["g.jpeg", "g.jpg", "g.png", "g.webp"]


def test_grid_filled_a_batch_at_a_time(tmp_path):
    imgs = torch.randint(0, 255, (5, 3, 4, 4), dtype=torch.uint8)
    whole = data.Grid(5, 4, 4)
    whole.put(imgs)
    parts = data.Grid(5, 4, 4)
    parts.put(imgs[:2])
    parts.put(imgs[2:4])
    parts.put(imgs[4:], start=4)
    assert parts.filled == 5 and whole.image.tobytes() == parts.image.tobytes()
