"""``python -m bench.loop`` (also ``python -m bench --loop``): the training CLI's step against a bare step.

- ``train CLI``: ``fast_unet.train.main`` itself (its defaults: B=16, 32x32, the embedded data set, AdamW,
  ``--log-every 50``; no checkpoint or sample inside the timed steps): the time from the hook after step
  ``warmup`` to the hook after step ``warmup + steps``, over ``steps``. It includes everything the loop does
  per step: the batch from the prefetch thread, the noise, ``q_sample``, the forward, loss, backward, the
  optimizer, the EMA, the loss kept on the device and its reads, the CSV rows, the progress counter.
- ``bare step``: the same model on fixed inputs in a plain loop: forward, MSE, ``zero_grad``, backward,
  ``torch.optim.AdamW`` with torch's default implementation, ``.step()``; nothing else.
- ``bare step, CLI's optimizer``: the same with the optimizer ``fast_unet.loop.make_optimizer`` builds
  (fused AdamW where the device has it), so the ratio shows what the loop around the step costs.

On CUDA every variant runs under ``torch.autocast`` (bf16) as the CLI does, and the CLI replays its step from
a CUDA graph (``--no-graph`` passes it on). Each round runs every variant once, in turn (interleaved); the
table gives the median of the rounds' ms per step and the CLI's ratio to each bare step (the median of the
rounds' ratios), and the same from each variant's fastest round (on a shared machine other work only slows a
round down).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _cli_step(batch, size, device, warmup, steps, threads, graph, log_every):
    from fast_unet import train

    marks = {}

    def hook(step):
        if step in (warmup, warmup + steps):
            _sync(device)
            marks[step] = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        train.main(["--out", out, "--steps", str(warmup + steps), "--batch-size", str(batch), "--image-size",
                    str(size), "--save-every", "0", "--sample-every", "0", "--no-progress", "--device", device,
                    "--threads", str(threads), "--log-every", str(log_every)] + ([] if graph else ["--no-graph"]),
                   on_step=hook)
    return (marks[warmup + steps] - marks[warmup]) / steps


def _bare_step(batch, size, device, warmup, steps, fused_like_cli):
    from fast_unet import UNet
    from fast_unet.loop import make_optimizer

    torch.manual_seed(0)
    model = UNet(device=str(device)).to(device).train()
    if fused_like_cli:
        opt = make_optimizer(model.parameters(), "adamw", 3e-4, 0.01, device)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    x = torch.randn(batch, 3, size, size, device=device)
    t = torch.randint(1, 1000, (batch,), device=device)
    eps = torch.randn_like(x)
    cuda = torch.device(device).type == "cuda"

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            pred = model(x, t)
        loss = F.mse_loss(pred.float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def run(batch=16, size=32, device=None, warmup=2, steps=10, rounds=3, graph=True, log_every=50, threads=None,
        say=print):
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    cases = {
        "train CLI": lambda: _cli_step(batch, size, device, warmup, steps, threads, graph, log_every),
        "bare step": lambda: _bare_step(batch, size, device, warmup, steps, False),
        "bare step, CLI's optimizer": lambda: _bare_step(batch, size, device, warmup, steps, True),
    }
    times = {name: [] for name in cases}
    for r in range(rounds):
        for name, fn in cases.items():
            say(f"round {r + 1}/{rounds}: {name}")
            times[name].append(fn())
    cli = times["train CLI"]
    rows = []
    for name, ts in times.items():
        ratios = [c / s for c, s in zip(cli, ts)]
        rows.append({"variant": name, "ms_per_step": 1e3 * statistics.median(ts), "ms_rounds": [1e3 * s for s in ts],
                     "images_per_s": batch / statistics.median(ts), "cli_over_this": statistics.median(ratios),
                     "ms_best": 1e3 * min(ts), "cli_over_this_best": min(cli) / min(ts)})
    return {"batch": batch, "size": size, "device": device, "threads": threads, "warmup": warmup,
            "steps": steps, "rounds": rounds, "graph": graph and torch.device(device).type == "cuda",
            "log_every": log_every, "rows": rows}


def format_result(res):
    from fast_unet.info import device_name

    lines = [f"Training step, CLI against bare: {device_name(res['device'])}, torch {torch.__version__}, "
             f"{res['threads']} thread(s), B={res['batch']}, {res['size']}x{res['size']}, float32 weights"
             f"{', bf16 autocast' if torch.device(res['device']).type == 'cuda' else ''}"
             f"{', CLI graphed' if res['graph'] else ''}; {res['steps']} timed steps after {res['warmup']} per "
             f"run, median of {res['rounds']} interleaved rounds (the ratio: median of the rounds' ratios)", "",
             "| variant | ms per step | images/s | CLI / this | best round (ms) | CLI / this, best rounds | rounds (ms) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['variant']} | {r['ms_per_step']:.1f} | {r['images_per_s']:.1f} | "
                     f"{r['cli_over_this']:.3f} | {r['ms_best']:.1f} | {r['cli_over_this_best']:.3f} | "
                     f"{', '.join(f'{v:.1f}' for v in r['ms_rounds'])} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.loop", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16, help="per step (default: 16, the CLI's)")
    p.add_argument("--size", type=int, default=32, help="image size (default: 32, the CLI's)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per run (default: 2)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run (default: 10)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    p.add_argument("--log-every", type=int, default=50, help="the CLI's --log-every (default: 50)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for every variant (default: torch's); on a CPU shared with other work one "
                        "thread gives steadier times")
    p.add_argument("--no-graph", dest="graph", action="store_false", help="CUDA: the CLI with --no-graph")
    p.add_argument("--json", default=os.path.join("bench_results", "loop.json"), help="'' for none")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    say = (lambda m: None) if args.quiet else (lambda m: print(f"[bench.loop] {m}", file=sys.stderr, flush=True))
    res = run(args.batch, args.size, args.device, args.warmup, args.steps, args.rounds, args.graph,
              args.log_every, args.threads, say)
    print(format_result(res))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
