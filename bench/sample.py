"""``python -m bench.sample`` (also ``python -m bench --sample``): sampling and training throughput.

Sampling: seconds for 1000-step DDPM (999 model calls) and 50-step DDIM sampling, and images per second, at
B=16, 64x64 by default, for
- ``seed loop``: the seed's UNet (``fast_unet.reference``, attention with ``need_weights=True`` as the seed
  has it) in the original project's loop (``Diffusion.sample``: a fresh ``t`` tensor and schedule lookups
  per step, out-of-place update);
- ``baseline loop``: the fair eager baseline (the seed with ``need_weights=False``) in the same loop;
- ``fast_unet``: ``fast_unet.UNet`` in ``Diffusion.sample_fast`` (static buffers, in-place update; on CUDA one
  step captured in a CUDA graph and replayed);
- ``compiled`` (CUDA only, ``--compile``): ``torch.compile(mode="reduce-overhead")`` of the baseline in the
  original loop.

A step's time is the median, over interleaved rounds, of a run of ``--steps-timed`` steps divided by their
number; a sampler's total is that times its number of steps (every step does the same work: one model
call and one update). Training: images per second of the train command's step (forward, MSE on the
noise, backward, AdamW, EMA update) for fast_unet at the same batch and size.

On a CPU the seed's loop at B=16, 64x64 takes seconds per step: the totals are extrapolated from the
timed steps, never run in full.
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _models(size, device, compile_):
    from fast_unet import UNet
    from fast_unet.reference import make_reference

    torch.manual_seed(0)
    fast = UNet().to(device)
    state = fast.state_dict()
    out = {}
    for name, need_weights in (("seed loop", True), ("baseline loop", False)):
        m = make_reference(size, size, need_weights=need_weights).to(device)
        m.load_state_dict(state, strict=True)
        out[name] = m
    if compile_:
        out["compiled"] = torch.compile(out["baseline loop"], mode="reduce-overhead")
    out["fast_unet"] = fast
    return out


def run(batch=16, size=64, device=None, steps_timed=None, rounds=3, compile_=False, say=print):
    """{"rows": [...], "train": {...}, ...}: per sampler the seconds per step, for 1000 DDPM and 50 DDIM
    steps, and images per second."""
    from fast_unet.diffusion import Diffusion

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(device).type == "cuda"
    steps_timed = steps_timed or (20 if cuda else 2)
    compile_ = compile_ and cuda
    models = _models(size, device, compile_)
    # steps_timed + 1 noise steps: the loops run steps_timed model calls
    short = Diffusion(noise_steps=steps_timed + 1, img_size=size, device=device)
    full = Diffusion(noise_steps=1000, img_size=size, device=device)
    short.beta, short.alpha, short.alpha_hat = (v[-(steps_timed + 1):].clone() for v in
                                                (full.beta, full.alpha, full.alpha_hat))

    def plain(model):
        return lambda: short.sample(model, batch, progress=False)

    cases = {name: plain(m) for name, m in models.items() if name != "fast_unet"}
    fast = models["fast_unet"]
    cases["fast_unet"] = lambda: short.sample_fast(fast, batch, sampler="ddpm", progress=False)
    say(f"sampling: warm-up (B={batch}, {size}x{size}, {device})")
    for fn in cases.values():
        fn()
    per_step = {name: [] for name in cases}
    for r in range(rounds):
        say(f"sampling: round {r + 1}/{rounds}")
        for name, fn in cases.items():
            per_step[name].append(_timed(fn, device) / steps_timed)
    rows = []
    for name, times in per_step.items():
        s = statistics.median(times)
        rows.append({"model": name, "sampler": "sample_fast" if name == "fast_unet" else "Diffusion.sample",
                     "ms_per_step": 1e3 * s, "ddpm_1000_s": 999 * s, "ddim_50_s": 50 * s,
                     "ddpm_images_per_s": batch / (999 * s), "ddim_images_per_s": batch / (50 * s)})
    train = _train_throughput(fast, batch, size, device, rounds, say)
    return {"batch": batch, "size": size, "device": device, "steps_timed": steps_timed, "rounds": rounds,
            "rows": rows, "train": train}


def _train_throughput(model, batch, size, device, rounds, say):
    """Images per second of one training step as ``python -m fast_unet.train`` runs it."""
    from fast_unet.diffusion import Diffusion

    say("training step: warm-up")
    model.train()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    diffusion = Diffusion(img_size=size, device=device)
    x0 = torch.randn(batch, 3, size, size, device=device).clamp(-1, 1)
    cuda = torch.device(device).type == "cuda"

    def step():
        t = diffusion.sample_timesteps(batch).to(device)
        x_t, noise = diffusion.noise_images(x0, t)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = F.mse_loss(model(x_t, t).float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - 0.999)

    step()
    times = []
    for r in range(rounds):
        times.append(_timed(step, device))
    s = statistics.median(times)
    return {"ms_per_step": 1e3 * s, "images_per_s": batch / s, "autocast_bf16": cuda}


def format_result(res):
    from fast_unet.info import device_name

    seed = next(r for r in res["rows"] if r["model"] == "seed loop")
    lines = [f"Sampling and training: {device_name(res['device'])}, torch {torch.__version__}, B={res['batch']}, "
             f"{res['size']}x{res['size']}, float32 weights; per-step times are medians of {res['rounds']} "
             f"interleaved rounds of {res['steps_timed']} steps, totals = per step x steps", "",
             "| model | loop | ms per step | 1000-step DDPM (s) | 50-step DDIM (s) | DDPM images/s | DDIM images/s | "
             "vs seed loop |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['model']} | {r['sampler']} | {r['ms_per_step']:.1f} | {r['ddpm_1000_s']:.1f} | "
                     f"{r['ddim_50_s']:.1f} | {r['ddpm_images_per_s']:.3f} | {r['ddim_images_per_s']:.2f} | "
                     f"{seed['ms_per_step'] / r['ms_per_step']:.2f}x |")
    t = res["train"]
    lines += ["", f"training step (fast_unet; forward, MSE, backward, AdamW, EMA"
              f"{', bf16 autocast' if t['autocast_bf16'] else ''}): {t['ms_per_step']:.0f} ms, "
              f"{t['images_per_s']:.1f} images/s"]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--device", default=None)
    p.add_argument("--steps-timed", type=int, default=None, help="steps per timed run (default 2 on a CPU, 20 on CUDA)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="CUDA: add torch.compile(mode='reduce-overhead') of the baseline")
    p.add_argument("--json", default=os.path.join("bench_results", "sample.json"), help="'' for none")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    say = (lambda m: None) if args.quiet else (lambda m: print(f"[bench.sample] {m}", file=sys.stderr, flush=True))
    res = run(args.batch, args.size, args.device, args.steps_timed, args.rounds, args.compile, say)
    print(format_result(res))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
