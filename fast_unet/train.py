"""Train the DDPM noise predictor: ``python -m fast_unet.train [--data DIR] --out DIR ...``.

Single process, or several under ``torchrun`` (DistributedDataParallel; gloo on the CPU, NCCL on CUDA).
``--batch-size`` is per process; the global batch is ``batch_size * world_size``. The data order
(DistributedSampler, ``set_epoch``) and the noise (one generator shared by all ranks, drawn for the global
batch, each rank taking its own samples) depend only on ``--seed`` and the step, so a run on W processes
sees the same (image, t, noise) triples as a single process with the global batch.

Files in ``--out`` (rank 0 only): ``checkpoint.pt`` (model, EMA, optimizer, step, RNG and data-order state,
the arguments; tensors and plain values only, read back with ``torch.load(weights_only=True)``),
``checkpoint.prev.pt`` (the one before it), ``model.pt`` and ``ema.pt`` (plain state_dicts, load with
``strict=True`` into ``fast_unet.UNet`` and ``fast_unet.reference.UNet``), ``model.safetensors`` and
``ema.safetensors`` (the same tensors), ``losses.csv``, ``samples/step_XXXXXX.png`` and, while a run is on,
``.lock`` (its PID: a second trainer on the same ``--out`` is refused; a lock whose process is gone is taken
over). Every file is written to ``NAME.tmp`` and renamed, so a kill or a full disk leaves the last complete
file in place.

``--resume DIR`` continues the run exactly: the run's flags that are not given again are the checkpoint's;
``--lr`` / ``--weight-decay`` given again are applied to the optimizer (and logged), another ``--optimizer``
is refused. A damaged ``checkpoint.pt`` falls back to ``checkpoint.prev.pt``; ``losses.csv`` is cut back to
the checkpoint's step. A non-finite loss stops the run without saving, the last checkpoint kept.

The loop does not wait for the device between steps: each step's loss stays in a device buffer that is read
every ``--log-every`` steps, at every save and sample point and at the end (losses.csv gets one row per step
then, the progress bar its loss, and a non-finite loss among them stops the run; a checkpoint is only written
right after a read that found every loss finite); Ctrl-C is acted on at those reads (with DDP the losses and
the stop flag share one all-reduce, at the same steps on every rank). The next batches are built on a
background thread (pinned memory and non-blocking copies on CUDA); AdamW is fused where the device has the
kernel; the EMA is one ``torch._foreach_lerp_``. On CUDA with one process the whole step (forward, loss,
backward, optimizer, EMA) is captured once in a CUDA graph and replayed (``--no-graph``: eager launches).
The pieces are in ``fast_unet.loop``, for a loop of one's own.
"""
import argparse
import contextlib
import copy
import csv
import io
import math
import os
import random
import signal
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from . import UNet
from .diffusion import Diffusion
from .data import EmbeddedShapes, ImageFolder, save_grid
from .loop import LossLog, Prefetch, TrainStep, ema_weight, load_optimizer_state, make_optimizer
from .files import (FileError, RunLock, UnsafeFileError, atomic_torch_save, atomic_write, safe_load,
                    save_safetensors)

CHECKPOINT = "checkpoint.pt"
PREV_CHECKPOINT = "checkpoint.prev.pt"
WEIGHT_FILES = ("model.pt", "ema.pt", "model.safetensors", "ema.safetensors")

# The flags that define a run. Their parser default is None: a fresh run takes these values, ``--resume`` the
# checkpoint's (falling back to these for a checkpoint that did not record one).
RUN_DEFAULTS = {
    "data": None, "image_size": 32, "batch_size": 16, "steps": 1000, "lr": 3e-4, "optimizer": "adamw",
    "weight_decay": 0.01, "ema_decay": 0.999, "noise_steps": 1000, "sample_every": 0, "sample_n": 4,
    "sample_steps": 10, "save_every": 500, "embedded_size": 512, "seed": 0,
}

# Below this many steps the samples are still mostly noise: on the embedded data at 32x32, batch 16, the EMA
# weights' samples begin to show its shapes around 2400 steps (measured: README, "When samples take shape").
SAMPLES_TAKE_SHAPE = 2400


class TrainError(RuntimeError):
    """A problem with the command line, the data or the output folder, reported before training starts."""


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default: for a run flag (RUN_DEFAULTS) a new run's value and, on
    --resume, the checkpoint's; for the others the parser's default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or not action.option_strings or action.dest == "help":
            return text
        if action.dest in RUN_DEFAULTS:
            d = RUN_DEFAULTS[action.dest]
            return f"{text} (default: {'the embedded data set' if d is None else d}; on --resume: the checkpoint's)"
        return f"{text} (default: %(default)s)"


def build_parser():
    p = argparse.ArgumentParser(prog="python -m fast_unet.train", description=__doc__.split("\n\n")[0],
                                formatter_class=_HelpFormatter,
                                epilog="--resume DIR continues a run: the flags marked 'on --resume: the "
                                       "checkpoint's' take the checkpoint's value unless given again; a value "
                                       "given again is logged as a change (KEY OLD -> NEW from step N).")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="folder of training images, read recursively, resized and centre-cropped")
    p.add_argument("--image-size", type=int, default=None, help="image side in pixels, a multiple of 8")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per step and process (the global batch is this times the processes)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps to train up to, counted from the run's start")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate; given on --resume, it replaces the checkpoint's in the optimizer")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default=None,
                   help="adamw, or sgd (no momentum; for tests: its update is linear in the gradient); "
                        "--resume refuses a different one")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="AdamW weight decay; given on --resume, it replaces the checkpoint's")
    p.add_argument("--ema-decay", type=float, default=None,
                   help="decay of the weights' exponential moving average (ema.pt), with a warm-up")
    p.add_argument("--noise-steps", type=int, default=None, help="diffusion steps T of the noise schedule")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: --resume's folder, else runs/ddpm)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="folder holding checkpoint.pt (or a .pt file) to continue; default: a new run")
    p.add_argument("--sample-every", type=int, default=None,
                   help="write a DDIM sample grid of the EMA weights to OUT/samples/ every N steps; 0: never")
    p.add_argument("--sample-n", type=int, default=None, help="images in each sample grid")
    p.add_argument("--sample-steps", type=int, default=None, help="DDIM steps of each sample grid")
    p.add_argument("--save-every", type=int, default=None,
                   help="write checkpoint.pt and the weight files every N steps, and at the end; 0: only at the end")
    p.add_argument("--embedded-size", type=int, default=None,
                   help="images in the embedded generated data set (used without --data)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=None, help="seed of the data order, the noise and the weights")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads); on a machine shared with other work, fewer "
                        "threads than cores can be faster (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log-every", type=int, default=50,
                   help="read the losses from the device every N steps: losses.csv gets their rows, the "
                        "progress bar its loss, a non-finite loss stops the run, and Ctrl-C is checked then "
                        "(also at every save and sample, and at the end) (default: 50)")
    p.add_argument("--no-graph", action="store_true",
                   help="CUDA: run each training step eagerly instead of replaying it from a CUDA graph "
                        "(default: graphed on CUDA with one process; the CPU and DDP run eagerly)")
    return p


def _check_args(args):
    """The values that are set (None: not given, resolved later) are valid."""
    def bad(cond, msg):
        if cond:
            raise TrainError(msg)
    v = args
    bad(v.image_size is not None and (v.image_size % 8 or v.image_size < 8),
        f"--image-size must be a positive multiple of 8, got {v.image_size}")
    bad(v.batch_size is not None and v.batch_size < 1, f"--batch-size must be >= 1, got {v.batch_size}")
    bad(v.steps is not None and v.steps < 0, f"--steps must be >= 0, got {v.steps}")
    bad(v.lr is not None and not (math.isfinite(v.lr) and v.lr >= 0), f"--lr must be finite and >= 0, got {v.lr}")
    bad(v.weight_decay is not None and not (math.isfinite(v.weight_decay) and v.weight_decay >= 0),
        f"--weight-decay must be finite and >= 0, got {v.weight_decay}")
    bad(v.ema_decay is not None and not 0 <= v.ema_decay <= 1, f"--ema-decay must be in [0, 1], got {v.ema_decay}")
    bad(v.noise_steps is not None and v.noise_steps < 2, f"--noise-steps must be >= 2, got {v.noise_steps}")
    for k in ("sample_every", "save_every"):
        bad(getattr(v, k) is not None and getattr(v, k) < 0, f"--{k.replace('_', '-')} must be >= 0")
    for k in ("sample_n", "sample_steps", "embedded_size"):
        bad(getattr(v, k) is not None and getattr(v, k) < 1, f"--{k.replace('_', '-')} must be >= 1")
    if v.device is not None:
        try:
            dev = torch.device(v.device)
        except (RuntimeError, ValueError):
            raise TrainError(f"--device {v.device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
        bad(dev.type == "cuda" and not torch.cuda.is_available(),
            f"--device {v.device}: CUDA is not available here")
    bad(v.log_every < 1, f"--log-every must be >= 1, got {v.log_every}")
    bad(v.threads is not None and v.threads < 0, f"--threads must be >= 0 (0: torch's default), got {v.threads}")


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


# -- files ------------------------------------------------------------------------------------------------------

def _rng_state(noise_gen, device):
    """Every RNG state as tensors (the checkpoint loads with weights_only=True)."""
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(), "noise": noise_gen.get_state(),
             "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                        "gauss_next": gauss_next}}
    if torch.cuda.is_available() and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state, noise_gen, device):
    torch.set_rng_state(state["torch"])
    py = state["python"]
    if isinstance(py, dict):
        random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    else:  # a tuple, as random.getstate() returns it
        random.setstate(py)
    noise_gen.set_state(state["noise"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state_all(state["cuda"])


_CHECKPOINT_KEYS = ("model", "ema", "optimizer", "step", "data", "rng", "args")


def load_checkpoint(resume, log=print):
    """``(checkpoint, path read, fell_back)``: the checkpoint ``--resume`` names (a folder's checkpoint.pt, or a
    .pt) read with the safe loader; ``fell_back`` when ``checkpoint.pt`` was damaged or missing and
    ``checkpoint.prev.pt`` beside it was read instead."""
    path = resume if resume.endswith(".pt") else os.path.join(resume, CHECKPOINT)
    folder = os.path.dirname(path) or "."
    prev = os.path.join(folder, PREV_CHECKPOINT)
    can_fall_back = os.path.basename(path) == CHECKPOINT and os.path.isfile(prev)
    if not os.path.lexists(path) and not can_fall_back:
        raise TrainError(f"--resume {resume!r}: no {CHECKPOINT} there; nothing to resume")
    try:
        if not os.path.lexists(path):
            raise FileError(f"--resume: {path} is missing (a save was interrupted between two renames)")
        ckpt = safe_load(path, "--resume")
    except UnsafeFileError as e:
        raise TrainError(str(e)) from None
    except FileError as e:
        if not can_fall_back:
            raise TrainError(f"{e}; there is no {PREV_CHECKPOINT} beside it to fall back to: start a new run "
                             "(another --out)") from None
        try:
            ckpt = _check_checkpoint(safe_load(prev, "--resume"), prev)
        except FileError as e2:
            raise TrainError(f"{e}; {PREV_CHECKPOINT} cannot be used either: {e2}") from None
        log(f"{e}; resuming from {prev} (step {ckpt['step']}) instead")
        return ckpt, prev, True
    return _check_checkpoint(ckpt, path), path, False


def _check_checkpoint(ckpt, path):
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in _CHECKPOINT_KEYS):
        have = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise TrainError(f"--resume {path!r} is not a checkpoint of fast_unet.train (it holds {have}; a "
                         f"checkpoint has {', '.join(_CHECKPOINT_KEYS)})")
    return ckpt


def _optimizer_kind(opt_state):
    groups = opt_state.get("param_groups") or [{}]
    return "adamw" if "betas" in groups[0] else "sgd" if "momentum" in groups[0] else None


# Flags whose change on --resume alters the run's trajectory (a warning); the others are logged as a change.
_TRAJECTORY = ("data", "image_size", "batch_size", "noise_steps", "embedded_size", "seed", "ema_decay", "optimizer")


def _resolve_args(args, ckpt, world, log):
    """Fill the run flags not given: the checkpoint's values on resume, else RUN_DEFAULTS. On resume, refuse
    another optimizer or a data folder that is gone, and log each flag given again with another value as a
    change ("KEY OLD -> NEW from step N"; ``lr`` and ``weight_decay`` when applied to the optimizer). Returns
    the checkpoint's arguments ({} for a new run)."""
    given = {k for k in RUN_DEFAULTS if getattr(args, k) is not None}
    saved = dict(ckpt["args"]) if ckpt is not None else {}
    if ckpt is not None and "optimizer" not in saved:
        saved["optimizer"] = _optimizer_kind(ckpt["optimizer"])
    for k, default in RUN_DEFAULTS.items():
        if k not in given:
            setattr(args, k, saved[k] if saved.get(k) is not None else default)
    if ckpt is None:
        return saved
    step = ckpt["step"]
    if saved.get("optimizer") is not None and args.optimizer != saved["optimizer"]:
        raise TrainError(f"--optimizer {args.optimizer}: the checkpoint was trained with {saved['optimizer']}, "
                         f"whose state cannot continue under {args.optimizer}; resume with --optimizer "
                         f"{saved['optimizer']} (or without --optimizer), or start a new run in another --out")
    if "data" not in given and args.data is not None and not os.path.isdir(args.data):
        where = (saved.get("data_fingerprint") or {}).get("path")
        if where and os.path.isdir(where):  # a relative path, resumed from another working directory
            args.data = where
        else:
            raise TrainError(f"--resume: the checkpoint's data folder {args.data!r} is not there (moved or "
                             f"deleted); give its new place with --data, or --data another folder")
    for k in sorted(given - {"steps", "lr", "weight_decay"}):
        old, new = saved.get(k), getattr(args, k)
        if k not in saved or old == new or old is None and k != "data":
            continue
        if k == "data":
            old, new = old or "(the embedded data set)", new or "(the embedded data set)"
        change = f"{k} {old} -> {new} from step {step}"
        log(f"warning: {change}: the run will not be the exact continuation" if k in _TRAJECTORY else change)
    if "world_size" in saved and saved["world_size"] != world:
        log(f"warning: resuming on {world} process(es), the checkpoint was written on {saved['world_size']}: "
            "the run will not be the exact continuation")
    return saved


def _check_data(args, saved, data, log):
    """Record the data folder's fingerprint in ``args`` (it goes into the checkpoint) and, on resume, say when
    the folder's files differ from the checkpoint's."""
    now = getattr(data, "fingerprint", None)
    before = saved.get("data_fingerprint")
    args.data_fingerprint = now
    if now is None or before is None or (now["files"], now["sha256"]) == (before["files"], before["sha256"]):
        return
    what = (f"holds {now['files']} file(s), {before['path']} held {before['files']}" if now["files"] != before["files"]
            else f"its {now['files']} files' names or sizes differ from those of {before['path']}")
    log(f"warning: --data {args.data} {what} when the checkpoint was written: training goes on with the folder "
        "as it is, not as the exact continuation")


def _check_writable(out):
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write_test_", delete=True):
            pass
    except OSError as e:
        raise TrainError(f"--out {out!r} is not writable: {e}") from None


def _remove_partial_files(out, log):
    """``NAME.tmp`` files a killed save left behind (the lock is held: no other trainer writes them)."""
    for name in (CHECKPOINT, *WEIGHT_FILES, "losses.csv"):
        tmp = os.path.join(out, name + ".tmp")
        if os.path.isfile(tmp):
            os.remove(tmp)
            log(f"removed {tmp}, left by an interrupted save")


def _cut_losses(csv_path, step, log):
    """Keep losses.csv's header and its rows up to ``step`` (the checkpoint's): the rows after it belong to
    steps the resumed run does again."""
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    keep, dropped = [], 0
    for i, row in enumerate(rows):
        try:
            row_step = int(row[0])
        except (IndexError, ValueError):
            if i == 0:  # the header
                keep.append(row)
            continue
        if row_step <= step:
            keep.append(row)
        else:
            dropped += 1
    if not keep or keep[0][:1] != ["step"]:
        keep.insert(0, ["step", "loss", "lr", "seconds"])

    def write(f):  # rewritten whole: a row cut short by a kill does not join the next one
        text = io.StringIO()
        csv.writer(text).writerows(keep)
        f.write(text.getvalue().encode())
    atomic_write(csv_path, write)
    if dropped:
        log(f"losses.csv: removed {dropped} row(s) after step {step}, the checkpoint's step")


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
    _check_args(args)
    try:  # needed for model.safetensors / ema.safetensors: found missing now, not at the first save
        import safetensors.torch  # noqa: F401
    except ImportError:
        raise TrainError("the safetensors package is not installed (pip install safetensors)") from None
    if args.resume is not None:
        path = args.resume if args.resume.endswith(".pt") else os.path.join(args.resume, CHECKPOINT)
        folder = os.path.dirname(path) or "."
        if not os.path.lexists(path) and not (os.path.basename(path) == CHECKPOINT
                                              and os.path.isfile(os.path.join(folder, PREV_CHECKPOINT))):
            raise TrainError(f"--resume {args.resume!r}: no {CHECKPOINT} there; nothing to resume")
        if args.out is None:
            args.out = folder
    if args.out is None:
        args.out = os.path.join("runs", "ddpm")

    rank, world, device = _dist_setup(args.device)
    old_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _train(args, rank, world, device, on_step)
    finally:
        torch.set_num_threads(old_threads)
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(args, rank, world, device, on_step):
    """Rank 0 checks ``--out`` and takes its lock (every rank stops if that fails), then trains."""
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    problem, lock = None, None
    if rank == 0:
        try:
            _check_writable(args.out)
            lock = RunLock(args.out, what="--out").acquire(log)
            _remove_partial_files(args.out, log)
        except (TrainError, FileError) as e:
            problem = e
    try:
        if world > 1:  # every rank stops, not only rank 0 (the others would wait in the first all-reduce)
            flag = [str(problem) if problem else None]
            dist.broadcast_object_list(flag, src=0)
            if flag[0] is not None:
                raise TrainError(flag[0])
        elif problem is not None:
            raise TrainError(str(problem))
        return _train_locked(args, rank, world, device, on_step, log)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(args, rank, world, device, on_step, log):
    ckpt, ckpt_read, fell_back = None, None, False
    if args.resume is not None:
        ckpt, ckpt_read, fell_back = load_checkpoint(args.resume, log)
    saved_args = _resolve_args(args, ckpt, world, log)
    _check_args(args)

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if args.data is not None:
        try:
            data = ImageFolder(args.data, args.image_size, progress=(rank == 0 and not args.no_progress))
        except (FileNotFoundError, ValueError) as e:
            raise TrainError(str(e)) from None
        if data.skipped:
            log(f"skipped {data.skipped} non-image file(s) in {args.data}: {data.skip_summary()}")
    else:
        data = EmbeddedShapes(args.embedded_size, args.image_size, seed=args.seed)
    _check_data(args, saved_args, data, log)
    order = BatchOrder(len(data), args.batch_size, world, rank, args.seed)

    model = UNet(device=str(device)).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    graph, no_graph_why = device.type == "cuda" and not args.no_graph, None
    if graph and world > 1:  # DDP's all-reduce runs inside backward: the step is not captured
        graph, no_graph_why = False, "DDP's gradient all-reduce runs inside the step"
    opt = make_optimizer(model.parameters(), args.optimizer, args.lr, args.weight_decay, device,
                         capturable=graph)
    diffusion = Diffusion(noise_steps=args.noise_steps, img_size=args.image_size, device=str(device))
    noise_gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    step = 0
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            load_optimizer_state(opt, ckpt["optimizer"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise TrainError(f"--resume: the checkpoint does not fit this model or optimizer: "
                             f"{str(e).strip().splitlines()[0]}") from None
        step = ckpt["step"]
        order.load_state_dict(ckpt["data"])
        _set_rng_state(ckpt["rng"], noise_gen, device)
        log(f"resumed from step {step}")
        # The optimizer's state holds the checkpoint's hyperparameters: the values given now replace them.
        for key in ("lr", "weight_decay") if args.optimizer == "adamw" else ("lr",):
            old, new = opt.param_groups[0].get(key), getattr(args, key)
            if old is not None and old != new:
                for g in opt.param_groups:
                    g[key] = new
                log(f"{key} {old} -> {new} from step {step}")
    saved_step = step if ckpt is not None else None  # the step of the newest checkpoint on disk, and its file
    saved_path = ckpt_read

    ddp = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    global_batch = args.batch_size * world
    if no_graph_why is not None:
        log(f"training step not captured in a CUDA graph: {no_graph_why}")
    log(f"training on {device} x{world}: global batch {global_batch} ({world} x {args.batch_size}), "
        f"lr {args.lr}, {len(data)} images of {args.image_size}x{args.image_size}, steps {step}->{args.steps}")

    ckpt_path = os.path.join(args.out, CHECKPOINT)
    # A checkpoint.pt that resume found damaged is replaced, not kept as checkpoint.prev.pt.
    rotate = {"ok": not (fell_back and os.path.samefile(os.path.dirname(ckpt_read) or ".", args.out))}
    ckpt = None  # the loaded tensors are in the model and optimizer now

    def kept():
        if saved_step is None:
            return "no checkpoint was written in this run"
        return f"the last checkpoint, step {saved_step}, is kept in {saved_path}"

    def checkpoint():
        nonlocal saved_step, saved_path
        if rank != 0:
            return
        m = _unwrap(ddp)
        msd, esd = m.state_dict(), ema.state_dict()
        atomic_torch_save({"model": msd, "ema": esd, "optimizer": opt.state_dict(), "step": step,
                           "data": dict(data_state), "rng": _rng_state(noise_gen, device),
                           "args": dict(vars(args), world_size=world)},
                          ckpt_path, keep=os.path.join(args.out, PREV_CHECKPOINT) if rotate["ok"] else None)
        rotate["ok"] = True
        saved_step, saved_path = step, ckpt_path
        atomic_torch_save(msd, os.path.join(args.out, "model.pt"))
        atomic_torch_save(esd, os.path.join(args.out, "ema.pt"))
        save_safetensors(msd, os.path.join(args.out, "model.safetensors"))
        save_safetensors(esd, os.path.join(args.out, "ema.safetensors"))

    csv_file = None
    if rank == 0:
        csv_path = os.path.join(args.out, "losses.csv")
        new = step == 0 or not os.path.exists(csv_path)
        if not new:
            _cut_losses(csv_path, step, log)
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
    train_step = TrainStep(ddp, ema, opt, diffusion, graph=graph,
                           autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    losses = LossLog(args.log_every, device)
    pending = {"first": step + 1, "t": time.perf_counter()}  # the steps whose losses are in ``losses``

    def read(final=False):
        """Move the pending losses to the host (DDP: one all-reduce with the stop flag): their CSV rows, the
        bar's loss; a non-finite loss stops the run. True when some rank asked to stop."""
        n, first = len(losses), pending["first"]
        if n == 0 and final:
            return False
        values, stop_any = losses.read(world, stop["flag"])
        now = time.perf_counter()
        per_step = (now - pending["t"]) / max(n, 1)
        pending["first"], pending["t"] = first + n, now
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if csv_file is not None:
            writer.writerows([first + i, f"{v:.6f}", args.lr, f"{per_step:.4f}"]
                             for i, v in enumerate(values[:bad]))
            csv_file.flush()
        if bad is not None:
            raise TrainError(f"the loss is {values[bad]} at step {first + bad}: training stopped without saving "
                             f"that step; {kept()} (a lower --lr may help)")
        if values:
            bar.set_postfix(loss=f"{values[-1]:.4f}")
        return stop_any

    def next_batch():  # the prefetch thread: data order and the images, each batch with the order after it
        idx = order.next()
        x = data.batch(idx)
        if device.type == "cuda":
            x = x.pin_memory()
        return order.state_dict(), x

    data_state = order.state_dict()
    prefetch = Prefetch(next_batch) if step < args.steps else None
    bar = tqdm(total=args.steps, initial=step, disable=(rank != 0 or args.no_progress), unit="step")
    interrupted, in_step = False, False
    t_start = time.perf_counter()
    try:
        try:
            ddp.train()
            while step < args.steps:
                in_step = True
                data_state, x = prefetch.next()
                x = x.to(device, non_blocking=True)
                # Noise for the whole global batch from the shared generator; this rank takes its samples.
                t_all = torch.randint(1, args.noise_steps, (global_batch,), generator=noise_gen, device=device)
                e_all = torch.randn((global_batch, 3, args.image_size, args.image_size), generator=noise_gen,
                                    device=device)
                losses.add(train_step(x, t_all[rank::world], e_all[rank::world],
                                      ema_weight(step, args.ema_decay)))
                step += 1
                in_step = False
                bar.update(1)
                sample = args.sample_every and step % args.sample_every == 0
                save = args.save_every and step % args.save_every == 0 and step < args.steps
                if step % args.log_every == 0 or sample or save or step == args.steps:
                    stopping = read()  # every rank reads at the same steps: the all-reduce stays matched
                else:
                    stopping = False
                if sample and rank == 0:
                    _write_sample(ema, diffusion, args.out, step, args.sample_n, args.sample_steps, args.seed)
                if save:
                    checkpoint()
                if on_step is not None:
                    on_step(step)
                if stopping:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if prefetch is not None:
                prefetch.close()
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
        if not in_step:
            read(final=True)
        bar.close()
        if world > 1 and not interrupted:
            log(f"ranks' weights max |difference| from rank 0: {_rank_weight_diff(_unwrap(ddp)):.3g}")
        if in_step:  # interrupted inside a step: the weights may be half-updated; keep the last checkpoint
            log(f"interrupted inside step {step + 1}: the last checkpoint on disk is kept")
        else:
            checkpoint()
    except FileError as e:  # a save failed (full disk, ...): the files before it are whole
        raise TrainError(f"{e}; training stopped at step {step}; {kept()}") from None
    finally:
        bar.close()
        if csv_file is not None:
            if world == 1 and len(losses) and not in_step:  # stopped by an error: the completed steps' rows
                with contextlib.suppress(Exception):
                    read(final=True)
            csv_file.close()
    elapsed = time.perf_counter() - t_start
    if interrupted:
        log(f"interrupted: checkpoint at step {step} written to {args.out}; continue with --resume {args.out}")
    else:
        log(f"done: {step} steps in {elapsed:.1f}s; files in {args.out}")
        if step < SAMPLES_TAKE_SHAPE:
            log(_noise_note(step, args.out))
    return {"step": step, "interrupted": interrupted, "model": _unwrap(ddp), "ema": ema}


def _noise_note(step, out):
    return (f"note: after {step} steps the samples are still mostly noise; on the embedded data set at 32x32, "
            f"batch 16, they begin to take shape around {SAMPLES_TAKE_SHAPE} steps: continue with --resume {out} "
            f"--steps {SAMPLES_TAKE_SHAPE} or more")


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
    except (TrainError, FileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 130 if result["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(cli())
