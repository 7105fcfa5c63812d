"""Sample a grid of images: ``python -m fast_unet.sample --weights DIR/ema.pt --out grid.png``.

``--weights`` takes ``model.pt`` / ``ema.pt`` (plain state_dicts), a ``checkpoint.pt`` from
``fast_unet.train`` (its EMA weights), or any seed-UNet state_dict (``torch.save(model.state_dict())``,
prefixes ``module.`` / ``_orig_mod.`` are stripped). Weights of another architecture are refused with the
mismatched keys named.
"""
import argparse
import sys
import time

import torch

from . import UNet
from .data import save_grid
from .diffusion import Diffusion


class SampleError(RuntimeError):
    pass


def load_weights(path):
    """The UNet state_dict held in ``path``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise SampleError(f"--weights {path!r}: no such file") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input error
        raise SampleError(f"--weights {path!r} is not a torch checkpoint: {e}") from None
    if isinstance(obj, dict) and "ema" in obj and isinstance(obj["ema"], dict):
        obj = obj["ema"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
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
    if missing or unexpected or shapes:
        def few(xs):
            return ", ".join(xs[:8]) + (f" (+{len(xs) - 8} more)" if len(xs) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch {len(shapes)}: {few(shapes)}")
        raise SampleError("the weights are not a seed UNet (UNet(c_in=3, c_out=3, time_dim=128)): "
                          + "; ".join(parts))


def build_parser():
    p = argparse.ArgumentParser(prog="python -m fast_unet.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddim")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (ddpm uses all --noise-steps)")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--noise-steps", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="grid.png")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads); default: torch's")
    p.add_argument("--no-graph", action="store_true", help="CUDA: run the loop without a CUDA graph")
    return p


def main(argv=None):
    old = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(old)


def _main(argv):
    args = build_parser().parse_args(argv)
    if args.image_size % 8 or args.image_size < 8:
        raise SampleError(f"--image-size must be a positive multiple of 8, got {args.image_size}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    sd = load_weights(args.weights)
    model = UNet(device=str(device))
    check_keys(sd, model)
    model.load_state_dict(sd, strict=True)
    model.to(device)
    d = Diffusion(noise_steps=args.noise_steps, img_size=args.image_size, device=str(device))
    g = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.perf_counter()
    imgs = d.sample_fast(model, args.n, sampler=args.sampler, steps=args.steps, eta=args.eta, generator=g,
                         graph=not args.no_graph)
    dt = time.perf_counter() - t0
    save_grid(imgs, args.out)
    print(f"wrote {args.out}: {args.n} images {args.image_size}x{args.image_size}, {args.sampler}, {dt:.2f}s")
    return args.out


def cli(argv=None):
    try:
        main(argv)
    except SampleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
