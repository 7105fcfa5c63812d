"""Train the DDPM noise predictor: ``python -m fast_unet.train [--data DIR] --out DIR ...``.

Single process, or several under ``torchrun`` (DistributedDataParallel; gloo on the CPU, NCCL on CUDA).
``--batch-size`` is per process; the global batch is ``batch_size * world_size``. The data order
(DistributedSampler, ``set_epoch``) and the noise (one generator shared by all ranks, drawn for the global
batch, each rank taking its own samples) depend only on ``--seed`` and the step, so a run on W processes
sees the same (image, t, noise) triples as a single process with the global batch.

Files in ``--out`` (rank 0 only): ``checkpoint.pt`` (model, EMA, optimizer, step, RNG and data-order state;
``--resume DIR`` continues it exactly), ``model.pt`` and ``ema.pt`` (plain state_dicts, load with
``strict=True`` into ``fast_unet.UNet`` and ``fast_unet.reference.UNet``), ``losses.csv`` and
``samples/step_XXXXXX.png``.
"""
import argparse
import contextlib
import copy
import csv
import math
import os
import random
import signal
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from . import UNet
from .diffusion import Diffusion
from .data import EmbeddedShapes, ImageFolder, save_grid

CHECKPOINT = "checkpoint.pt"


class TrainError(RuntimeError):
    """A problem with the command line, the data or the output folder, reported before training starts."""


def build_parser():
    p = argparse.ArgumentParser(prog="python -m fast_unet.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="image folder (default: the embedded generated data set)")
    p.add_argument("--image-size", type=int, default=32, help="multiple of 8")
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--steps", type=int, default=1000, help="total optimizer steps")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                   help="sgd (no momentum) exists for tests: its update is linear in the gradient")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--noise-steps", type=int, default=1000)
    p.add_argument("--out", default=None, help="output folder (default: --resume's folder, else runs/ddpm)")
    p.add_argument("--resume", default=None, metavar="DIR", help="folder holding checkpoint.pt to continue")
    p.add_argument("--sample-every", type=int, default=0, help="write a DDIM sample grid every N steps (0: off)")
    p.add_argument("--sample-n", type=int, default=4)
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--save-every", type=int, default=500, help="write checkpoint.pt every N steps")
    p.add_argument("--embedded-size", type=int, default=512, help="images in the embedded data set")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads); default: torch's. On a machine shared with "
                        "other work, fewer threads than cores can be faster")
    p.add_argument("--no-progress", action="store_true")
    return p


# -- distributed ------------------------------------------------------------------------------------------------

def _dist_setup(device_arg):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device_arg is None:
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_arg)
    if world <= 1:
        return 0, 1, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _barrier_any(flag, world, device):
    """True on every rank if ``flag`` is true on any rank."""
    if world <= 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# -- files ------------------------------------------------------------------------------------------------------

def _check_writable(out):
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write_test_", delete=True):
            pass
    except OSError as e:
        raise TrainError(f"--out {out!r} is not writable: {e}") from None


def _atomic_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state(noise_gen, device):
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "noise": noise_gen.get_state()}
    if torch.cuda.is_available() and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state, noise_gen, device):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    noise_gen.set_state(state["noise"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state_all(state["cuda"])


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


# -- data order ---------------------------------------------------------------------------------------------

class BatchOrder:
    """Batches of dataset indices for this rank: DistributedSampler (shuffle, seed, ``set_epoch``), cut into
    whole batches (the incomplete last batch of an epoch is dropped). State: (epoch, batch in epoch)."""

    def __init__(self, n, batch_size, world, rank, seed):
        self.sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)
        self.batch_size = batch_size
        self.per_epoch = len(self.sampler) // batch_size
        if self.per_epoch < 1:
            raise TrainError(f"the data set has {n} images: too few for batch size {batch_size} on "
                             f"{world} process(es)")
        self.epoch, self.pos, self._indices = 0, 0, None

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s):
        self.epoch, self.pos, self._indices = s["epoch"], s["pos"], None

    def next(self):
        if self.pos >= self.per_epoch:
            self.epoch, self.pos, self._indices = self.epoch + 1, 0, None
        if self._indices is None:
            self.sampler.set_epoch(self.epoch)
            self._indices = list(self.sampler)
        b = self._indices[self.pos * self.batch_size:(self.pos + 1) * self.batch_size]
        self.pos += 1
        return b


# -- training -----------------------------------------------------------------------------------------------

def _write_sample(ema, diffusion, out, step, n, steps, seed):
    g = torch.Generator(device=diffusion.device).manual_seed(seed)
    imgs = diffusion.sample_fast(ema, n, sampler="ddim", steps=steps, generator=g, progress=False)
    os.makedirs(os.path.join(out, "samples"), exist_ok=True)
    save_grid(imgs, os.path.join(out, "samples", f"step_{step:06d}.png"))


def main(argv=None, on_step=None):
    """Run training. ``on_step(step)`` (tests) is called after each completed step; KeyboardInterrupt raised
    there or by Ctrl-C writes a checkpoint that ``--resume`` continues."""
    args = build_parser().parse_args(argv)
    if args.image_size % 8 or args.image_size < 8:
        raise TrainError(f"--image-size must be a positive multiple of 8, got {args.image_size}")
    if args.batch_size < 1 or args.steps < 0:
        raise TrainError("--batch-size must be >= 1 and --steps >= 0")
    ckpt = None
    if args.resume is not None:
        path = args.resume if args.resume.endswith(".pt") else os.path.join(args.resume, CHECKPOINT)
        if not os.path.isfile(path):
            raise TrainError(f"--resume {args.resume!r}: no {CHECKPOINT} there; nothing to resume")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if args.out is None:
            args.out = os.path.dirname(path) or "."
    if args.out is None:
        args.out = os.path.join("runs", "ddpm")

    rank, world, device = _dist_setup(args.device)
    old_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _train(args, ckpt, rank, world, device, on_step)
    finally:
        torch.set_num_threads(old_threads)
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(args, ckpt, rank, world, device, on_step):
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    problem = None
    if rank == 0:
        try:
            _check_writable(args.out)
        except TrainError as e:
            problem = e
    if world > 1:  # every rank stops, not only rank 0 (the others would wait in the first all-reduce)
        flag = [str(problem) if problem else None]
        dist.broadcast_object_list(flag, src=0)
        if flag[0] is not None:
            raise TrainError(flag[0])
    elif problem is not None:
        raise problem

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if args.data is not None:
        try:
            data = ImageFolder(args.data, args.image_size, progress=(rank == 0 and not args.no_progress))
        except (FileNotFoundError, ValueError) as e:
            raise TrainError(str(e)) from None
        if data.skipped:
            log(f"skipped {data.skipped} non-image file(s) in {args.data}")
    else:
        data = EmbeddedShapes(args.embedded_size, args.image_size, seed=args.seed)
    order = BatchOrder(len(data), args.batch_size, world, rank, args.seed)

    model = UNet(device=str(device)).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    diffusion = Diffusion(noise_steps=args.noise_steps, img_size=args.image_size, device=str(device))
    noise_gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    step = 0
    if ckpt is not None:
        saved = ckpt["args"]
        for k in ("image_size", "noise_steps", "batch_size", "world_size"):
            mine = world if k == "world_size" else getattr(args, k)
            if saved.get(k) != mine:
                log(f"warning: resuming with {k}={mine}, the checkpoint was written with {saved.get(k)}: "
                    "the run will not be the exact continuation")
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        order.load_state_dict(ckpt["data"])
        _set_rng_state(ckpt["rng"], noise_gen, device)
        log(f"resumed from step {step}")

    ddp = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    global_batch = args.batch_size * world
    log(f"training on {device} x{world}: global batch {global_batch} ({world} x {args.batch_size}), "
        f"lr {args.lr}, {len(data)} images of {args.image_size}x{args.image_size}, steps {step}->{args.steps}")

    def checkpoint():
        if rank != 0:
            return
        m = _unwrap(ddp)
        _atomic_save({"model": m.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                      "step": step, "data": order.state_dict(), "rng": _rng_state(noise_gen, device),
                      "args": {"image_size": args.image_size, "noise_steps": args.noise_steps,
                               "batch_size": args.batch_size, "world_size": world, "seed": args.seed,
                               "lr": args.lr}},
                     os.path.join(args.out, CHECKPOINT))
        _atomic_save(m.state_dict(), os.path.join(args.out, "model.pt"))
        _atomic_save(ema.state_dict(), os.path.join(args.out, "ema.pt"))

    csv_file = None
    if rank == 0:
        csv_path = os.path.join(args.out, "losses.csv")
        new = ckpt is None or not os.path.exists(csv_path)
        csv_file = open(csv_path, "w" if new else "a", newline="")
        writer = csv.writer(csv_file)
        if new:
            writer.writerow(["step", "loss", "lr", "seconds"])

    stop = {"flag": False}

    def on_sigint(signum, frame):
        if stop["flag"]:
            raise KeyboardInterrupt
        stop["flag"] = True

    old_handler = signal.signal(signal.SIGINT, on_sigint) if _main_thread() else None
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    params, ema_params = list(model.parameters()), list(ema.parameters())
    bar = tqdm(total=args.steps, initial=step, disable=(rank != 0 or args.no_progress), unit="step")
    interrupted, in_step = False, False
    t_start = time.perf_counter()
    try:
        ddp.train()
        while step < args.steps:
            t0 = time.perf_counter()
            in_step = True
            idx = order.next()
            x = data.batch(idx).to(device, non_blocking=True)
            # Noise for the whole global batch from the shared generator; this rank takes its samples.
            t_all = torch.randint(1, args.noise_steps, (global_batch,), generator=noise_gen, device=device)
            e_all = torch.randn((global_batch, 3, args.image_size, args.image_size), generator=noise_gen,
                                device=device)
            t, eps = t_all[rank::world], e_all[rank::world]
            x_t = diffusion.q_sample(x, t, eps)
            with autocast:
                pred = ddp(x_t, t)
            loss = F.mse_loss(pred.float(), eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # EMA with the usual warm-up, min(decay, (1 + n) / (10 + n)), so short runs' EMA is not the init.
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema_params, params):
                    e.lerp_(p, 1 - decay)
            step += 1
            in_step = False
            lv = loss.detach()
            if world > 1:
                dist.all_reduce(lv, op=dist.ReduceOp.SUM)
                lv = lv / world
            lv = lv.item()
            if not math.isfinite(lv):
                raise FloatingPointError(f"loss is {lv} at step {step}; the last checkpoint is kept")
            if csv_file is not None:
                writer.writerow([step, f"{lv:.6f}", args.lr, f"{time.perf_counter() - t0:.4f}"])
                csv_file.flush()
            bar.set_postfix(loss=f"{lv:.4f}")
            bar.update(1)
            if args.sample_every and step % args.sample_every == 0 and rank == 0:
                _write_sample(ema, diffusion, args.out, step, args.sample_n, args.sample_steps, args.seed)
            if args.save_every and step % args.save_every == 0 and step < args.steps:
                checkpoint()
            if on_step is not None:
                on_step(step)
            if _barrier_any(stop["flag"], world, device):
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
    if world > 1 and not interrupted:
        log(f"ranks' weights max |difference| from rank 0: {_rank_weight_diff(_unwrap(ddp)):.3g}")
    if in_step:  # interrupted inside a step: the weights may be half-updated; keep the last checkpoint
        log(f"interrupted inside step {step + 1}: the last checkpoint on disk is kept")
    else:
        checkpoint()
    if csv_file is not None:
        csv_file.close()
    elapsed = time.perf_counter() - t_start
    if interrupted:
        log(f"interrupted: checkpoint at step {step} written to {args.out}; continue with --resume {args.out}")
    else:
        log(f"done: {step} steps in {elapsed:.1f}s; files in {args.out}")
    return {"step": step, "interrupted": interrupted, "model": _unwrap(ddp), "ema": ema}


def _rank_weight_diff(model):
    """Largest absolute difference of any rank's parameters from rank 0's (0 when DDP kept them in step)."""
    worst = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    with torch.no_grad():
        for p in model.parameters():
            ref = p.detach().clone()
            dist.broadcast(ref, src=0)
            worst = torch.maximum(worst, (p.detach() - ref).abs().max().double())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst.item()


def _main_thread():
    import threading
    return threading.current_thread() is threading.main_thread()


def cli(argv=None):
    try:
        result = main(argv)
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 130 if result["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(cli())
