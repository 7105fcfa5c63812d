"""Sample a grid of images: ``python -m fast_unet.sample --weights DIR/ema.safetensors --out grid.png``.

``--weights`` takes ``model.safetensors`` / ``ema.safetensors``, ``model.pt`` / ``ema.pt`` (plain
state_dicts), a ``checkpoint.pt`` from ``fast_unet.train`` (its EMA weights), or any seed-UNet state_dict
(``torch.save(model.state_dict())``, prefixes ``module.`` / ``_orig_mod.`` are stripped). Every ``.pt`` is
read with ``torch.load(weights_only=True)``: a file that holds anything beyond tensors and plain containers
is refused, and nothing in it runs. Weights of another architecture are refused with the mismatched keys
named, weights holding NaN or Inf with the tensor named.

Images are sampled ``--batch-size`` at a time; the grid ``--out`` (format from its extension: .png, .jpg,
.webp, ...) is written as batches finish (at most every 10 s, and at the end), and with ``--out-dir`` each
image also as its own PNG. The same ``--seed`` and ``--batch-size`` give the same images. Bad flags, a
missing output folder or an unknown extension are reported before any work, in one line (exit code 2).
"""
import argparse
import math
import os
import sys
import tempfile
import time

import torch
from tqdm import tqdm

from . import UNet
from .data import Grid, image_format, save_image
from .diffusion import Diffusion
from .files import FileError, UnsafeFileError, load_state_dict_file

GRID_EVERY_S = 10.0


class SampleError(RuntimeError):
    pass


def load_weights(path):
    """The UNet state_dict held in ``path`` (.safetensors, or a .pt through the safe loader)."""
    try:
        obj = load_state_dict_file(path, "--weights")
    except ImportError:
        raise SampleError(f"--weights {path!r}: reading .safetensors needs the safetensors package "
                          "(pip install safetensors)") from None
    except UnsafeFileError as e:
        raise SampleError(f"{e} (a state_dict saved with torch.save(model.state_dict()), or a .safetensors "
                          "file, loads)") from None
    except FileError as e:
        raise SampleError(str(e)) from None
    if isinstance(obj, dict) and "ema" in obj and isinstance(obj["ema"], dict):
        obj = obj["ema"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise SampleError(f"--weights {path!r} holds a {type(obj).__name__}, not a state_dict")
    sd = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        sd[k] = v
    return sd


def check_keys(sd, model):
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [f"{k} {tuple(sd[k].shape)} != {tuple(want[k].shape)}" for k in want
              if k in sd and hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(want[k].shape)]
    not_tensors = [k for k in want if k in sd and not isinstance(sd[k], torch.Tensor)]
    if missing or unexpected or shapes or not_tensors:
        def few(xs):
            return ", ".join(xs[:8]) + (f" (+{len(xs) - 8} more)" if len(xs) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch {len(shapes)}: {few(shapes)}")
        if not_tensors:
            parts.append(f"not tensors {len(not_tensors)}: {few(not_tensors)}")
        raise SampleError("the weights are not a seed UNet (UNet(c_in=3, c_out=3, time_dim=128)): "
                          + "; ".join(parts))


def check_finite(sd, path):
    """Refuse weights with NaN or Inf values, naming the first such tensor (they sample a black grid)."""
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        v = sd[bad[0]]
        nan, inf = int(torch.isnan(v).sum()), int(torch.isinf(v).sum())
        more = f"; {len(bad) - 1} more tensor(s) too" if len(bad) > 1 else ""
        raise SampleError(f"--weights {path!r}: tensor {bad[0]} holds {nan} NaN and {inf} Inf of its "
                          f"{v.numel()} values{more}: the weights are damaged (a run that diverged?)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)"; a required option has none, and an option whose default is None says in its
    help what happens when it is not given."""

    def _get_help_string(self, action):
        if action.required or action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m fast_unet.sample", description=__doc__.split("\n\n")[0],
                                formatter_class=_HelpFormatter)
    p.add_argument("--weights", required=True, metavar="FILE",
                   help="the weights: model.safetensors / ema.safetensors, model.pt / ema.pt, the trainer's "
                        "checkpoint.pt (its EMA weights), or a seed UNet state_dict .pt")
    p.add_argument("--n", type=int, default=16, help="images to sample")
    p.add_argument("--batch-size", type=int, default=64, help="images sampled at once")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddim",
                   help="ddim (--steps steps) or ddpm (all --noise-steps steps)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (ddpm uses all --noise-steps)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale: 0 deterministic, 1 DDPM-like")
    p.add_argument("--noise-steps", type=int, default=1000,
                   help="diffusion steps T of the noise schedule the weights were trained with")
    p.add_argument("--image-size", type=int, default=32,
                   help="image side in pixels, a multiple of 8 (the size the weights were trained at)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sampling noise: the same seed and --batch-size give the same images")
    p.add_argument("--out", default="grid.png", help="the grid image; its extension picks the format")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="also write each image as DIR/NNNNNN.png, the folder created if missing (default: only the grid)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads) (default: torch's)")
    p.add_argument("--no-graph", action="store_true", help="CUDA: run the loop without a CUDA graph")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _writable_folder(folder, flag, path):
    if not os.path.isdir(folder):
        raise SampleError(f"{flag} {path!r}: the folder {folder!r} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test_"):
            pass
    except OSError as e:
        raise SampleError(f"{flag} {path!r}: the folder {folder!r} is not writable ({e.strerror or e})") from None


def check_args(args):
    """Every flag and output path, before any work. Returns the grid's Pillow format."""
    for ok, msg in (
            (args.n >= 1, f"--n must be >= 1, got {args.n}"),
            (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
            (args.steps >= 1, f"--steps must be >= 1, got {args.steps}"),
            (args.noise_steps >= 2, f"--noise-steps must be >= 2, got {args.noise_steps}"),
            (args.image_size >= 8 and args.image_size % 8 == 0,
             f"--image-size must be a positive multiple of 8, got {args.image_size}"),
            (math.isfinite(args.eta) and args.eta >= 0, f"--eta must be finite and >= 0, got {args.eta}"),
            (args.threads is None or args.threads >= 0,
             f"--threads must be >= 0 (0: torch's default), got {args.threads}")):
        if not ok:
            raise SampleError(msg)
    if args.device is not None:
        try:
            dev = torch.device(args.device)
        except (RuntimeError, ValueError):
            raise SampleError(f"--device {args.device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SampleError(f"--device {args.device}: CUDA is not available here")
    if os.path.isdir(args.out):
        raise SampleError(f"--out {args.out!r} is a folder; give a file name such as grid.png")
    try:
        fmt = image_format(args.out)
    except FileError as e:
        raise SampleError(f"--out {e}") from None
    _writable_folder(os.path.dirname(os.path.abspath(args.out)), "--out", args.out)
    if args.out_dir is not None:
        try:
            os.makedirs(args.out_dir, exist_ok=True)
        except OSError as e:
            raise SampleError(f"--out-dir {args.out_dir!r} cannot be created: {e.strerror or e}") from None
        _writable_folder(args.out_dir, "--out-dir", args.out_dir)
    return fmt


def main(argv=None):
    old = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(old)


def _main(argv):
    args = build_parser().parse_args(argv)
    check_args(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    sd = load_weights(args.weights)
    model = UNet(device=str(device))
    check_keys(sd, model)
    check_finite(sd, args.weights)
    model.load_state_dict(sd, strict=True)
    del sd
    model.to(device)
    d = Diffusion(noise_steps=args.noise_steps, img_size=args.image_size, device=str(device))
    g = torch.Generator(device=device).manual_seed(args.seed)
    n, bs, size = args.n, args.batch_size, args.image_size
    grid = Grid(n, size, size)
    width = max(6, len(str(n - 1)))
    bar = tqdm(total=n, unit="img", disable=args.no_progress, desc="sampling")
    t0 = time.perf_counter()
    last_grid, done = -math.inf, 0
    try:
        try:
            while done < n:
                b = min(bs, n - done)
                imgs = d.sample_fast(model, b, sampler=args.sampler, steps=args.steps, eta=args.eta, generator=g,
                                     graph=not args.no_graph, progress=False)
                grid.put(imgs, done)
                if args.out_dir is not None:
                    for j in range(b):
                        save_image(imgs[j], os.path.join(args.out_dir, f"{done + j:0{width}d}.png"), fmt="PNG")
                done += b
                bar.update(b)
                if done < n and time.perf_counter() - last_grid >= GRID_EVERY_S:
                    grid.save(args.out)
                    last_grid = time.perf_counter()
        finally:
            bar.close()
            if done:
                grid.save(args.out)
    except KeyboardInterrupt:
        print(f"interrupted: wrote {args.out} with the {done} of {n} images sampled" if done else
              "interrupted before the first batch finished: nothing written", file=sys.stderr)
        raise
    except FileError as e:
        raise SampleError(f"{e} ({done} of {n} images sampled)") from None
    dt = time.perf_counter() - t0
    extra = f", and {n} PNGs in {args.out_dir}" if args.out_dir is not None else ""
    print(f"wrote {args.out}: {n} images {size}x{size}, {args.sampler}, {dt:.2f}s{extra}")
    return args.out


def cli(argv=None):
    try:
        main(argv)
    except SampleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
