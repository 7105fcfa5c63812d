"""Images for training: an image folder (Pillow) or the embedded generated data set; sample grids."""
import math
import os
import random

import torch
from PIL import Image, ImageDraw, UnidentifiedImageError
from tqdm import tqdm

__all__ = ["EmbeddedShapes", "ImageFolder", "load_image", "save_grid"]


def _to_tensor(img):
    """PIL RGB image -> (3, H, W) uint8 tensor."""
    w, h = img.size
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1).clone()


def load_image(path, size):
    """Open with Pillow, convert to RGB, resize the shorter side to ``size`` and crop the centre."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return _to_tensor(im)


class _Images:
    images: torch.Tensor  # (N, 3, S, S) uint8

    def __len__(self):
        return self.images.shape[0]

    def batch(self, indices):
        """A float batch scaled to [-1, 1]."""
        return self.images[torch.as_tensor(indices, dtype=torch.long)].float() / 127.5 - 1


class ImageFolder(_Images):
    """Every image under ``root`` (recursive, sorted), loaded once into memory as uint8. Files Pillow cannot
    read are skipped and counted in ``self.skipped``."""

    def __init__(self, root, size, progress=False):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--data {root!r} is not a folder")
        paths = []
        for d, dirs, files in os.walk(root):
            dirs.sort()
            paths += [os.path.join(d, f) for f in sorted(files) if not f.startswith(".")]
        imgs, self.skipped = [], 0
        for p in tqdm(paths, desc="loading images", disable=not progress):
            try:
                imgs.append(load_image(p, size))
            except (UnidentifiedImageError, OSError, ValueError):
                self.skipped += 1
        if not imgs:
            raise ValueError(f"--data {root!r} holds no readable image ({len(paths)} file(s), "
                             f"{self.skipped} skipped)")
        self.images = torch.stack(imgs)


class EmbeddedShapes(_Images):
    """``n`` procedurally drawn images (coloured ellipses, rectangles and triangles on a two-colour gradient),
    deterministic by ``seed``; no download."""

    def __init__(self, n, size, seed=0):
        rng = random.Random(seed)
        self.images = torch.stack([_to_tensor(self._draw(rng, size)) for _ in range(n)])

    @staticmethod
    def _draw(rng, size):
        c0 = [rng.randrange(256) for _ in range(3)]
        c1 = [rng.randrange(256) for _ in range(3)]
        vertical = rng.random() < 0.5
        ramp = torch.linspace(0, 1, size)
        ramp = ramp[:, None].expand(size, size) if vertical else ramp[None, :].expand(size, size)
        grad = torch.stack([a + (b - a) * ramp for a, b in zip(c0, c1)], dim=-1).round().to(torch.uint8)
        img = Image.frombytes("RGB", (size, size), bytes(grad.contiguous().view(-1).tolist()))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randint(1, 3)):
            color = tuple(rng.randrange(256) for _ in range(3))
            r = rng.uniform(0.15, 0.35) * size
            cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
            kind = rng.randrange(3)
            if kind == 0:
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
            elif kind == 1:
                draw.rectangle((cx - r, cy - r * 0.7, cx + r, cy + r * 0.7), fill=color)
            else:
                a = rng.uniform(0, 2 * math.pi)
                pts = [(cx + r * math.cos(a + k * 2 * math.pi / 3), cy + r * math.sin(a + k * 2 * math.pi / 3))
                       for k in range(3)]
                draw.polygon(pts, fill=color)
        return img


def save_grid(images, path, nrow=None):
    """Save (N, 3, H, W) uint8 images as one grid PNG (Pillow), 2-pixel gaps."""
    images = images.detach().cpu()
    n, _, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    pad = 2
    grid = Image.new("RGB", (nrow * (w + pad) + pad, rows * (h + pad) + pad))
    for i in range(n):
        arr = images[i].permute(1, 2, 0).contiguous()
        tile = Image.frombytes("RGB", (w, h), bytes(arr.view(-1).tolist()))
        grid.paste(tile, (pad + (i % nrow) * (w + pad), pad + (i // nrow) * (h + pad)))
    tmp = path + ".tmp.png"
    grid.save(tmp)
    os.replace(tmp, path)
    return path
