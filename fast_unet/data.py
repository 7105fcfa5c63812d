"""Images for training: an image folder (Pillow) or the embedded generated data set; sample grids.

``load_image`` reads 16-bit grayscale (Pillow modes ``I;16*``, and 32-bit ``I`` taken as the same 0..65535
range) scaled to 0..255. ``ImageFolder`` skips, counts and names what it cannot use: files Pillow cannot read,
images over Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``), and anything that is not a
regular file (a FIFO named ``*.png`` would block the read). Grids are written in the format their name's
extension asks for (Pillow), through ``fast_unet.files.atomic_write``.
"""
import hashlib
import io
import math
import os
import random
import stat

import torch
from PIL import Image, ImageDraw, UnidentifiedImageError
from tqdm import tqdm

from .files import FileError, atomic_write

__all__ = ["EmbeddedShapes", "Grid", "ImageFolder", "image_format", "load_image", "save_grid", "save_image"]


def _to_tensor(img):
    """PIL RGB image -> (3, H, W) uint8 tensor."""
    w, h = img.size
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1).clone()


def _to_rgb(im):
    """RGB, with 16-bit (and 32-bit integer) grayscale scaled from 0..65535 to 0..255 (Pillow's own
    ``convert`` clips it: 32768 would read as 255)."""
    if im.mode.startswith("I"):
        im = im.convert("I")  # native-endian int32, whatever the 16-bit layout
        w, h = im.size
        v = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.int32).view(h, w)
        v = (v.double() / 257).round().clamp(0, 255).to(torch.uint8)
        im = Image.frombytes("L", (w, h), bytes(v.contiguous().view(-1).tolist()))
    return im.convert("RGB")


def load_image(path, size):
    """Open with Pillow, convert to RGB (16-bit grayscale scaled to 8 bits), resize the shorter side to
    ``size`` and crop the centre."""
    with Image.open(path) as im:
        im = _to_rgb(im)
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


def _why_not(path, size):
    """``(tensor, None)`` for a usable image, ``(None, reason)`` for a file to skip."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None, "not a regular file"
        return load_image(path, size), None
    except Image.DecompressionBombError:
        return None, f"over {Image.MAX_IMAGE_PIXELS} pixels (Pillow's decompression-bomb limit)"
    except UnidentifiedImageError:
        return None, "not an image"
    except (OSError, ValueError, SyntaxError) as e:
        return None, f"unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__}"


def folder_fingerprint(root, paths):
    """``{"path", "files", "sha256"}``: the folder's absolute path, how many files it holds and a SHA-256 of
    their names (relative to ``root``) and sizes, sorted. Plain values: it is stored in a checkpoint, and a
    resumed run compares it with the folder it reads."""
    h = hashlib.sha256()
    for p in sorted(paths):
        try:
            size = os.stat(p).st_size
        except OSError:
            size = -1
        h.update(f"{os.path.relpath(p, root)}\t{size}\n".encode())
    return {"path": os.path.abspath(root), "files": len(paths), "sha256": h.hexdigest()}


class ImageFolder(_Images):
    """Every image under ``root`` (recursive, sorted), loaded once into memory as uint8. Files that are not
    usable images (unreadable by Pillow, over the decompression-bomb limit, not regular files) are skipped:
    ``self.skipped`` counts them, ``self.skipped_files`` lists ``(path relative to root, reason)``.
    ``self.fingerprint`` identifies the folder's contents (see ``folder_fingerprint``)."""

    def __init__(self, root, size, progress=False):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--data {root!r} is not a folder")
        self.root = root
        paths = []
        for d, dirs, files in os.walk(root):
            dirs.sort()
            paths += [os.path.join(d, f) for f in sorted(files) if not f.startswith(".")]
        self.fingerprint = folder_fingerprint(root, paths)
        imgs, self.skipped_files = [], []
        for p in tqdm(paths, desc="loading images", disable=not progress):
            img, why = _why_not(p, size)
            if img is None:
                self.skipped_files.append((os.path.relpath(p, root), why))
            else:
                imgs.append(img)
        self.skipped = len(self.skipped_files)
        if not imgs:
            raise ValueError(f"--data {root!r} holds no readable image ({len(paths)} file(s), "
                             f"{self.skipped} skipped{': ' + self.skip_summary() if self.skipped else ''})")
        self.images = torch.stack(imgs)

    def skip_summary(self, few=3):
        """The first ``few`` skipped files with their reasons, and how many more."""
        s = ", ".join(f"{p} ({why})" for p, why in self.skipped_files[:few])
        more = self.skipped - few
        return s + (f" and {more} more" if more > 0 else "")


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


def image_format(path):
    """The Pillow format that ``path``'s extension names (``.png`` -> PNG, ``.jpg`` -> JPEG, ...), checked by
    writing a 1x1 RGB image in it; ``FileError`` for an extension Pillow cannot write RGB images as."""
    ext = os.path.splitext(str(path))[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if not ext or fmt is None or fmt not in Image.SAVE:
        raise FileError(f"{path!r}: {'no' if not ext else 'unknown'} image extension{' ' + ext if ext else ''}; "
                        "use .png, .jpg, .webp, .bmp, ...")
    try:
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=fmt)
    except (OSError, ValueError, KeyError) as e:
        raise FileError(f"{path!r}: Pillow cannot write RGB images as {fmt} ({e})") from None
    return fmt


def _save_options(fmt):
    return {"quality": 95} if fmt in ("JPEG", "WEBP") else {}


def _tile(img):
    """(3, H, W) uint8 tensor -> PIL RGB image."""
    _, h, w = img.shape
    hwc = img.detach().cpu().permute(1, 2, 0).contiguous()
    return Image.frombytes("RGB", (w, h), bytes(hwc.view(-1).tolist()))


def save_image(img, path, fmt=None):
    """One (3, H, W) uint8 image, in ``fmt`` or the format of ``path``'s extension (written to ``.tmp`` and
    renamed, no fsync: for many small files)."""
    fmt = fmt or image_format(path)
    pil = _tile(img)
    return atomic_write(path, lambda f: pil.save(f, format=fmt, **_save_options(fmt)), sync=False)


class Grid:
    """A grid of ``n`` tiles of ``h`` x ``w``, 2-pixel gaps, ``nrow`` per row (default ceil(sqrt(n))), filled a
    batch at a time (``put``) and written whenever asked (``save``; unfilled tiles are black). Memory: the grid
    image only."""

    pad = 2

    def __init__(self, n, h, w, nrow=None):
        self.n, self.h, self.w = n, h, w
        self.nrow = nrow or math.ceil(math.sqrt(n))
        rows = math.ceil(n / self.nrow)
        self.image = Image.new("RGB", (self.nrow * (w + self.pad) + self.pad, rows * (h + self.pad) + self.pad))
        self.filled = 0

    def put(self, images, start=None):
        """Paste (B, 3, h, w) uint8 images at tiles ``start``.. (default: after the last filled)."""
        start = self.filled if start is None else start
        for j, img in enumerate(images.detach().cpu()):
            i = start + j
            self.image.paste(_tile(img), (self.pad + (i % self.nrow) * (self.w + self.pad),
                                          self.pad + (i // self.nrow) * (self.h + self.pad)))
        self.filled = max(self.filled, start + len(images))

    def save(self, path):
        fmt = image_format(path)
        return atomic_write(path, lambda f: self.image.save(f, format=fmt, **_save_options(fmt)))


def save_grid(images, path, nrow=None):
    """Save (N, 3, H, W) uint8 images as one grid (Pillow; format from the extension), 2-pixel gaps."""
    n, _, h, w = images.shape
    grid = Grid(n, h, w, nrow)
    grid.put(images)
    return grid.save(path)
