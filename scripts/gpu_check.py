"""The project's one prepared GPU check: one command, under 7 minutes on one H200 with no network.

    python scripts/gpu_check.py [--out DIR]     # DIR defaults to $OUT, else ./gpu_check_out
    python scripts/gpu_check.py --dry --out DIR # every step's code path on the CPU (CI runs this)

First what decides the defaults, then correctness:

0. ``install``: builds the extension for sm_90 (``pip install -e .``) unless the one here loads with CUDA
   kernels (the dry run only checks that it loads).
1. ``env``: versions, the device, which backends load and how the extension was built.
2. ``defaults``: B=64, 64x64 forward and training step (forward, MSE, backward): fast_unet (every op fused),
   fast_unet with the fused ops on their eager twins and the fair eager baseline, each under
   ``torch.autocast`` (bf16) on float32 weights and as a bf16 model; medians of interleaved runs, and
   the backend each op ran on.
2a. ``attention``: the six attention blocks' shapes at B=64, 64x64, bf16: forward + backward of the Triton
   kernels on the default backward (one pass, dQ by atomics) and the deterministic one
   (``torch.use_deterministic_algorithms``), beside SDPA's; medians of interleaved runs, and each path's
   dqkv against SDPA's.
2b. ``compiled``: the same against ``torch.compile`` (inductor) of the baseline, timed side by side with
   fast_unet (its compilations take most of this step).
3. ``graphs``: a forward and a training step of fast_unet captured in a ``torch.cuda.CUDAGraph`` and
   replayed, against the same calls run eagerly.
3a. ``loop``: the training CLI's step (``fast_unet.loop.TrainStep`` with the loop's per-step work: noise,
   the batch's non-blocking copy, the loss kept on the device), graphed and ``--no-graph``, against a plain
   loop over the eager baseline (default AdamW, per-tensor EMA) and over ``torch.compile`` of it, at B=64,
   64x64, bf16 autocast on float32 weights: images/s of interleaved rounds; the graphed step's losses and
   weights after three steps against the eager step's.
4. ``sampling``: seconds per DDPM step and for 1000 steps (``bench.sample``: the seed's loop, the
   baseline's, fast_unet's ``sample_fast``).
5. ``tests``: ``pytest tests/gpu tests/ops -m gpu`` (the op tests' odd shapes on CUDA, the extension's CUDA
   kernels, the whole model's bf16/fp16 backward against eager, autocast, a second GPU where there is one).
6. ``ops``: ``python -m bench.ops``: every dispatched op at the model's shapes (B=64, bf16) on each backend
   against its eager twin, GB/s and fraction of the roofline; a table, JSON and a plot.
7. ``sweep``: ``python -m bench --sweep``: time and peak memory at B=64 from 32x32 to 256x256, JSON and
   plots.

Each step runs in its own process with a time limit; its results go to DIR/<step>.json and its output to
DIR/<step>.log. DIR/gpu_check.json holds every step (status ``ok``, ``failed``, ``timeout`` or ``skipped``
with the reason: nothing is left out silently) and DIR/summary.txt a short summary. The exit status is
non-zero when a step did not pass.

``--dry`` runs the same steps on CPU tensors at tiny sizes (B=1, 8x8; one timed run, which the loop step also
compares; ``aot_eager`` in place of inductor; the graph step calls the functions it would capture), so this
script cannot rot without a GPU: tests/interpret/test_gpu_check.py runs it. The steps that check which kernels
ran or compare them (``DRY_INTERPRETED``: defaults, attention, ops) run Triton under the interpreter; the
others measure, and take the CPU's ext/eager backends there.
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # every step imports this checkout's fast_unet and bench/ (not installed), whatever is installed
UNFUSED = "triton,conv3x3=eager,gn_relu_maxpool=eager,upsample2x=eager,gn_ln_linear=eager,mlp_residual=eager"

# step -> its time limit in seconds on a GPU (cut to what is left of the budget)
STEPS = {"install": 110, "env": 30, "defaults": 60, "attention": 30, "compiled": 100, "graphs": 30, "loop": 90,
         "tune": 60, "sampling": 40,
         "tests": 150, "ops": 60, "sweep": 120}
TOTAL_S = 420  # 7 minutes; --budget changes it
# the dry run's steps that run Triton under the interpreter: they check which kernels ran or compare them.
# The others measure: their dry run takes the CPU's ext/eager backends (the kernels they would call are tested
# under the interpreter by tests/interpret), and checks their code path and report.
DRY_INTERPRETED = ("defaults", "attention", "ops")


# --- the steps, each run in its own process (``--step NAME``) -------------------------------------------

def _setup(dry):
    import torch

    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry for the CPU code path")
    if dry and os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter's cost is per program: one large
        # tile per small sample (as tests/interpret)
        from fast_unet import backends

        for module, name, value in backends.interpreter_tiles():
            setattr(module, name, value)
    return torch, device


def step_install(dry):
    """Build fast_unet._C for sm_90 unless it already loads with its CUDA kernels."""
    def built():
        code = ("from fast_unet import backends; import json; "
                "print(json.dumps([backends.load_error('ext'), backends.build_info()]))")
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else [proc.stderr[-500:], {}]

    err, info = built()
    if dry or (err is None and info.get("cuda")):
        if err is not None:
            raise AssertionError(f"fast_unet._C does not load: {err}")
        return {"built": False, "build_info": info}
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST="9.0", MAX_JOBS=str(os.cpu_count() or 8))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    sys.stdout.write(proc.stdout[-5000:] + proc.stderr[-5000:])
    err, info = built()
    if proc.returncode or err is not None or not info.get("cuda"):
        raise AssertionError(f"the extension did not build with CUDA: rc={proc.returncode} {err} {info}")
    return {"built": True, "build_info": info}


def step_env(dry):
    torch, device = _setup(dry)
    import triton

    from fast_unet import backends, dispatch
    from fast_unet.info import device_name

    return {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "device": device_name(device), "device_count": torch.cuda.device_count(),
            "backends": {b: (why or "loads") for b, why in dispatch.backend_status().items()},
            "ext_build": backends.build_info(), "interpreting": backends.triton_interpreting()}


def _case(fn, setting=None, autocast=None):
    """fn() under ``FAST_UNET_BACKEND=setting`` and ``torch.autocast`` of (device, dtype) when given."""
    import torch

    from bench.core import backend_env

    def run():
        with contextlib.ExitStack() as stack:
            if setting is not None:
                stack.enter_context(backend_env(setting))
            if autocast is not None:
                stack.enter_context(torch.autocast(autocast[0], dtype=autocast[1]))
            return fn()

    return run


def _recording(fn, chosen, key):
    """fn, recording into ``chosen[key]`` the backend each dispatched op ran on."""
    from fast_unet import dispatch

    def run():
        dispatch.last_choice.clear()
        out = fn()
        chosen[key] = dict(dispatch.last_choice)
        return out

    return run


def _timings(dry, names):
    """Forward and training-step medians (ms) at B=64, 64x64 of the models ``names`` (of "baseline",
    "compiled", "fast_unet", "fast_unet unfused"), under autocast (float32 weights) and as a bf16 model,
    interleaved; with the backend each of fast_unet's ops ran on."""
    torch, device = _setup(dry)
    from bench import core

    batch, size = (1, 8) if dry else (64, 64)
    warmup, repeats = (0, 1) if dry else (3, 10)
    torch.manual_seed(0)
    state = core.build_model("fast_unet", size, size, torch.float32, "cpu").state_dict()
    results, fns, chosen = {}, {}, {}
    for precision in ("autocast", "bf16"):
        dtype = torch.float32 if precision == "autocast" else torch.bfloat16
        ac = (device, torch.bfloat16) if precision == "autocast" else None
        x, t, noise = core.make_inputs(batch, size, size, dtype, device)
        models = {}
        for name in names:
            if name == "compiled":
                models[name] = torch.compile(core.build_model("baseline", size, size, dtype, device, state),
                                             backend="aot_eager" if dry else "inductor")
            elif name == "fast_unet unfused":
                models[name] = models["fast_unet"] if "fast_unet" in models else core.build_model("fast_unet", size, size, dtype, device, state)
            else:
                models[name] = core.build_model(name, size, size, dtype, device, state)
        for name, model in models.items():
            setting = UNFUSED if name == "fast_unet unfused" else ("auto" if name.startswith("fast_unet") else None)
            for mode, make in (("forward", core.forward_fn), ("train", core.train_fn)):
                fn = _case(make(model, x, t) if mode == "forward" else make(model, x, t, noise), setting, ac)
                if name.startswith("fast_unet"):
                    fn = _recording(fn, chosen, f"{precision} {name} {mode}")
                fns[(precision, name, mode)] = fn
    if not dry:
        for fn in fns.values():  # a first call each: compilation, Triton's JIT
            fn()
    named = {" | ".join(k): fn for k, fn in fns.items()}
    times = core.time_interleaved(named, device, warmup, repeats)
    for key in fns:
        ms = 1e3 * statistics.median(times[" | ".join(key)])
        results.setdefault(key[0], {}).setdefault(key[2], {})[key[1]] = round(ms, 4)
    for modes in results.values():
        for row in modes.values():
            for other in ("baseline", "compiled", "fast_unet unfused"):
                if other in row:
                    row[f"{other} / fast_unet"] = round(row[other] / row["fast_unet"], 3)
    return {"batch": batch, "size": size, "device": device, "repeats": repeats, "ms": results,
            "backends_ran": chosen}


def step_defaults(dry):
    return _timings(dry, ["baseline", "fast_unet", "fast_unet unfused"])


# (N, heads, head dim) of the six attention blocks at a 64x64 input (sa1 ... sa6)
ATTENTION_BLOCKS = [(1024, 4, 32), (256, 4, 64), (64, 4, 64), (256, 4, 32), (1024, 4, 16), (4096, 4, 16)]


def step_attention(dry):
    """Forward + backward of each attention block: Triton one-pass, Triton deterministic, SDPA (eager)."""
    torch, device = _setup(dry)
    from bench import core
    from fast_unet import eager
    from fast_unet.ops.attention import triton_attention

    batch, dtype = (1, torch.float32) if dry else (64, torch.bfloat16)
    shapes = [(min(n, 16), h, d) for n, h, d in ATTENTION_BLOCKS] if dry else ATTENTION_BLOCKS
    warmup, repeats = (0, 1) if dry else (3, 10)

    def fwd_bwd(fn, qkv, do, deterministic=False):
        def run():
            before = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(deterministic)
            try:
                qkv.grad = None
                fn(qkv).backward(do)
                return qkv.grad
            finally:
                torch.use_deterministic_algorithms(before)
        return run

    rows, fns = [], {}
    for i, (n, h, d) in enumerate(shapes):
        g = torch.Generator(device="cpu").manual_seed(i)
        qkv = torch.randn(batch, n, 3, h, d, generator=g).to(device, dtype).requires_grad_()
        do = torch.randn(batch, n, h * d, generator=g).to(device, dtype)
        cases = {"one-pass": fwd_bwd(triton_attention, qkv, do),
                 "deterministic": fwd_bwd(triton_attention, qkv, do, True),
                 "sdpa": fwd_bwd(eager.attention, qkv, do)}
        ref = cases["sdpa"]().float()
        diffs = {k: round(((cases[k]().float() - ref).abs().max() / ref.abs().max()).item(), 5)
                 for k in ("one-pass", "deterministic")}
        if max(diffs.values()) > (1e-3 if dry else 5e-2):
            raise AssertionError(f"sa{i + 1} {(batch, n, h, d)}: dqkv differs from SDPA's by {diffs}")
        for k, fn in cases.items():
            fns[f"sa{i + 1} {k}"] = fn
        rows.append({"block": f"sa{i + 1}", "shape": [batch, n, h, d], "dqkv_rel_diff_vs_sdpa": diffs})
    if not dry:
        for fn in fns.values():
            fn()
    times = core.time_interleaved(fns, device, warmup, repeats)
    for i, row in enumerate(rows):
        ms = {k: round(1e3 * statistics.median(times[f"sa{i + 1} {k}"]), 4)
              for k in ("one-pass", "deterministic", "sdpa")}
        row["ms"] = ms
        row["sdpa / one-pass"] = round(ms["sdpa"] / ms["one-pass"], 3)
    return {"dtype": str(dtype), "device": device, "repeats": repeats, "rows": rows}


def step_compiled(dry):
    return _timings(dry, ["compiled", "fast_unet"])


def _capture(fn, cuda):
    """A replay function for ``fn``: its CUDA graph on a GPU (after a warm-up on a side stream, as PyTorch's
    CUDA-graph docs do); ``fn`` itself in the dry run."""
    if not cuda:
        return fn
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def step_graphs(dry):
    """fast_unet's forward and training step (under autocast) captured and replayed against eager calls."""
    torch, device = _setup(dry)
    import torch.nn.functional as F

    from fast_unet import UNet

    batch, size = (1, 8) if dry else (16, 64)
    cuda = not dry
    torch.manual_seed(0)
    model = UNet().to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    noise = torch.randn_like(x)
    out = {}

    # forward
    static_y = torch.empty_like(x)

    def forward():
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            static_y.copy_(model(x, t))

    replay = _capture(forward, cuda)
    x.copy_(torch.randn_like(x))  # new inputs into the static buffers
    replay()
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        expect = model(x, t).float()
    out["forward_max_abs_diff"] = (static_y - expect).abs().max().item()

    # training step: forward, loss, backward into static .grad tensors (zeroed in place, not set to None)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    static_loss = torch.zeros((), device=device)

    def train():
        for p in params:
            p.grad.zero_()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = F.mse_loss(model(x, t).float(), noise)
        loss.backward()
        static_loss.copy_(loss.detach())

    replay = _capture(train, cuda)
    replay()
    graph_grads = [p.grad.clone() for p in params]
    graph_loss = static_loss.item()
    train()
    out["train_loss_diff"] = abs(graph_loss - static_loss.item())
    out["train_grad_max_rel_diff"] = max(((g - p.grad).abs().max() / (p.grad.abs().max() + 1e-12)).item()
                                         for g, p in zip(graph_grads, params))
    out["captured"] = cuda
    ok = out["forward_max_abs_diff"] <= 1e-2 * max(expect.abs().max().item(), 1) and out["train_grad_max_rel_diff"] <= 1e-2
    if not ok:
        raise AssertionError(f"graph replay differs from eager: {out}")
    return out


def step_loop(dry):
    """The CLI's training step, graphed and eager, against plain loops over the baseline and its compile."""
    torch, device = _setup(dry)
    import copy

    import torch.nn.functional as F

    from bench import core
    from fast_unet.diffusion import Diffusion
    from fast_unet.loop import LossLog, TrainStep, ema_weight, make_optimizer

    batch, size = (1, 8) if dry else (64, 64)
    warmup, rounds, steps, compared = (0, 1, 1, 1) if dry else (3, 5, 10, 3)
    assert not dry or warmup + rounds * steps == compared  # the dry run compares its timed steps
    cuda = not dry
    torch.manual_seed(0)
    state = core.build_model("fast_unet", size, size, torch.float32, "cpu").state_dict()
    diffusion = Diffusion(img_size=size, device=device)
    x_host = torch.rand(batch, 3, size, size) * 2 - 1
    if cuda:
        x_host = x_host.pin_memory()

    def cli(graph):
        model = core.build_model("fast_unet", size, size, torch.float32, device, state)
        ema = copy.deepcopy(model).requires_grad_(False)
        opt = make_optimizer(model.parameters(), "adamw", 3e-4, 0.01, device, capturable=graph and cuda)
        step = TrainStep(model, ema, opt, diffusion, autocast_dtype=torch.bfloat16, graph=graph and cuda)
        log, gen, n = LossLog(50, device), torch.Generator(device=device).manual_seed(1), [0]

        def run():
            x = x_host.to(device, non_blocking=True)
            t = torch.randint(1, 1000, (batch,), generator=gen, device=device)
            eps = torch.randn((batch, 3, size, size), generator=gen, device=device)
            log.add(step(x, t, eps, ema_weight(n[0], 0.999)))
            n[0] += 1
            if len(log) == log.capacity:
                log.read()
        return run, model, log

    def plain(name):
        model = core.build_model("baseline", size, size, torch.float32, device, state)
        ema = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
        fwd = torch.compile(model, backend="aot_eager" if dry else "inductor") if name == "compiled" else model
        x0 = x_host.to(device)

        def run():
            t = diffusion.sample_timesteps(batch).to(device)
            x_t, noise = diffusion.noise_images(x0, t)
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = F.mse_loss(fwd(x_t, t).float(), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 1 - 0.999)
            loss.item()  # what a plain loop logs each step
        return run

    steps_cli = {True: cli(True), False: cli(False)}
    cases = {"fast_unet CLI step, graphed": steps_cli[True][0], "fast_unet CLI step, --no-graph": steps_cli[False][0],
             "baseline plain loop": plain("baseline"), "baseline compiled plain loop": plain("compiled")}

    def sync():
        if cuda:
            torch.cuda.synchronize()
    for fn in cases.values():  # capture, compilation, Triton's JIT
        for _ in range(warmup):
            fn()
    sync()
    seconds = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            sync()
            seconds[name].append((time.perf_counter() - t0) / steps)
    rows = [{"variant": name, "ms_per_step": round(1e3 * statistics.median(v), 4),
             "images_per_s": round(batch / statistics.median(v), 4)} for name, v in seconds.items()]
    base = {r["variant"]: r["ms_per_step"] for r in rows}
    for r in rows:
        r["baseline plain loop / this"] = round(base["baseline plain loop"] / r["ms_per_step"], 3)

    # the graphed step against the eager one: same start, same inputs, three steps (one in the dry run)
    runs = {}
    for graph in (True, False):
        if dry:  # each timed CLI step ran its one step from the same start: those are the compared ones
            run, model, log = steps_cli[graph]
        else:
            run, model, log = cli(graph)
            for _ in range(compared):
                run()
        runs[graph] = (log.read()[0], [p.detach().clone() for p in model.parameters()])
    (la, pa), (lb, pb) = runs[True], runs[False]
    loss_diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(la, lb))
    weight_diff = max(((a - b).abs().max() / (b.abs().max() + 1e-12)).item() for a, b in zip(pa, pb))
    out = {"batch": batch, "size": size, "device": device, "rounds": rounds, "steps": steps, "captured": cuda,
           "rows": rows, "graph_loss_max_rel_diff": loss_diff, "graph_weight_max_rel_diff": weight_diff}
    if not (loss_diff <= 1e-2 and weight_diff <= 1e-2):
        raise AssertionError(f"the graphed training step differs from the eager one: {out}")
    return out


def step_sampling(dry):
    torch, device = _setup(dry)
    from bench import sample

    res = sample.run(batch=1 if dry else 64, size=8 if dry else 64, device=device, steps_timed=1 if dry else 10,
                     rounds=1, say=lambda *a: None)
    return {"batch": res["batch"], "size": res["size"], "steps_timed": res["steps_timed"],
            "rows": res["rows"], "train": res["train"]}


def step_tests(dry):
    """The GPU tests, in a process of their own, in this step's environment (no interpreter: the step is not in
    ``DRY_INTERPRETED``). On the CPU they all skip: the dry run checks the command and the report, and lists
    the skips."""
    xml = os.path.join(os.environ["GPU_CHECK_OUT"], "tests.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/gpu", "tests/ops",
           "-m", "gpu", f"--junitxml={xml}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    sys.stdout.write(proc.stdout[-20000:])
    sys.stderr.write(proc.stderr[-5000:])
    import xml.etree.ElementTree as ET

    suite = ET.parse(xml).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [c.get("classname", "") + "::" + c.get("name", "") for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    skips = sorted({(s.get("message") or "")[:160] for s in suite.iter("skipped")})
    result = {"command": " ".join(cmd[2:]), "counts": counts, "failed": failed, "skip_reasons": skips}
    if proc.returncode not in (0, 5) or failed:
        raise AssertionError(json.dumps(result))
    return result


def _bench(cmd):
    """Run a ``python -m bench...`` command in this step's environment (the interpreter only in the dry run's
    ``DRY_INTERPRETED`` steps)."""
    proc = subprocess.run([sys.executable, "-m"] + cmd, cwd=ROOT, capture_output=True, text=True)
    sys.stdout.write(proc.stdout[-20000:])
    sys.stderr.write(proc.stderr[-5000:])
    if proc.returncode:
        raise AssertionError(f"python -m {' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-1500:]}")
    return "python -m " + " ".join(cmd)


def _ops_best(rows):
    """For each row of ``bench.ops``, its fastest non-eager backend: speed-up over eager, fraction of the roofline."""
    best = {}
    for r in rows:
        d = r["direction"]
        fast = {b: v[d] for b, v in r["results"].items() if b != "eager" and "ms" in v.get(d, {})}
        if fast:
            b, v = max(fast.items(), key=lambda kv: kv[1].get("vs_eager", 0))
            best[f"{r['op']} {d} {r['x']}"] = f"{b} {v.get('vs_eager', 0):.2f}x, {v['of_roofline']:.0%} of roofline"
    return best


def step_ops(dry):
    """``python -m bench.ops`` (dry: each op's code paths once on every backend, Triton under the interpreter;
    every op must have run on Triton and on eager)."""
    out = os.environ["GPU_CHECK_OUT"]
    path = os.path.join(out, "bench_ops.json")
    if dry:
        cmd = ["bench.ops", "--dry", "--batch", "1", "--sizes", "8", "--quiet", "--json", path, "--plot", ""]
    else:
        cmd = ["bench.ops", "--device", "cuda", "--sizes", "32,64", "--repeats", "10", "--quiet", "--json", path,
               "--out", os.path.join(out, "bench_ops.jsonl"), "--plot", os.path.join(out, "ops.png")]
    command = _bench(cmd)
    rows = json.load(open(path))["rows"]
    from fast_unet import dispatch

    missing = set(dispatch.OPS) - {r["op"] for r in rows}
    if missing:
        raise AssertionError(f"bench.ops left out {sorted(missing)}")
    if dry:
        bad = [(r["op"], r["direction"], b) for r in rows for b in ("triton", "eager")
               if r["results"].get(b, {}).get(r["direction"]) != {"ran": True}]
        if bad:
            raise AssertionError(f"did not run: {bad}")
        return {"command": command, "rows": len(rows)}
    return {"command": command, "rows": len(rows), "best_vs_eager": _ops_best(rows)}


def step_sweep(dry):
    """``python -m bench --sweep`` at B=64 from 32x32 to 256x256 (dry: B=1, 16x16, baseline and fast_unet,
    on ext/eager: a sweep measures, so the dry run does not interpret Triton)."""
    out = os.environ["GPU_CHECK_OUT"]
    path = os.path.join(out, "bench_sweep.json")
    if dry:
        cmd = ["bench", "--sweep", "--device", "cpu", "--sizes", "16", "--batches", "1", "--sweep-size", "16", "--models",
               "baseline,fast_unet", "--repeats", "1", "--warmup", "1", "--json", path, "--plots", ""]
    else:
        cmd = ["bench", "--sweep", "--device", "cuda", "--sizes", "32,64,128,256", "--batches", "64", "--sweep-size", "64",
               "--repeats", "5", "--json", path, "--plots", out]
    return {"command": _bench(cmd), "json": path}



def step_tune(dry):
    """``python -m bench --tune`` at B=64, 64x64 under bf16 autocast, forward and training step: fast_unet with
    measured dispatch (tuned from an empty cache in this run) beside the untuned one, interleaved, and the time
    the tuning took (dry: B=1, 8x8 on the CPU's ext/eager backends: tuning measures, so it interprets no Triton)."""
    out = os.environ["GPU_CHECK_OUT"]
    path = os.path.join(out, "bench_tune.json")
    common = ["bench", "--tune", "--models", "fast_unet,fast_unet_tuned", "--dtype", "autocast-bfloat16",
              "--no-memory", "--no-kernel-count", "--json", path]
    if dry:
        cmd = common + ["--device", "cpu", "--batch", "1", "--size", "8", "--repeats", "1", "--warmup", "1"]
    else:
        cmd = common + ["--device", "cuda", "--batch", "64", "--size", "64", "--repeats", "10"]
    env_cache = os.environ.pop("FAST_UNET_CACHE_DIR", None)  # bench --tune makes an empty one
    try:
        command = _bench(cmd)
    finally:
        if env_cache is not None:
            os.environ["FAST_UNET_CACHE_DIR"] = env_cache
    res = json.load(open(path))
    rows = {}
    for mode in ("forward", "train"):
        tuned, untuned = res["models"]["fast_unet_tuned"][mode], res["models"]["fast_unet"][mode]
        rows[mode] = {"untuned_ms": round(untuned["median_ms"], 3), "tuned_ms": round(tuned["median_ms"], 3),
                      "untuned / tuned": round(untuned["median_ms"] / tuned["median_ms"], 3),
                      "tuning_first_call_s": round(res["tuning"][mode]["first_call_s"], 2),
                      "tuning_timing_s": round(res["tuning"][mode]["timing_s"], 2)}
    return {"command": command, "batch": res["batch"], "size": f"{res['height']}x{res['width']}", "rows": rows}

# --- the driver ----------------------------------------------------------------------------------------

def _run_step(name, dry, out_dir, limit):
    """Run one step in a subprocess; (record, seconds)."""
    env = dict(os.environ, GPU_CHECK_OUT=out_dir, PYTHONUNBUFFERED="1")
    if dry and name in DRY_INTERPRETED:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, os.path.abspath(__file__), "--step", name, "--out", out_dir] + (["--dry"] if dry else [])
    t0 = time.time()
    with open(os.path.join(out_dir, f"{name}.log"), "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=limit)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    seconds = round(time.time() - t0, 1)
    path = os.path.join(out_dir, f"{name}.json")
    result = json.load(open(path)) if os.path.exists(path) else None
    if rc is None:
        record = {"status": "timeout", "limit_s": limit}
    elif rc == 0 and result is not None:
        record = {"status": result.pop("status", "ok"), **result}
    else:
        with open(os.path.join(out_dir, f"{name}.log")) as f:
            tail = f.read()[-1500:]
        record = {"status": "failed", "rc": rc, "log_tail": tail}
    record["seconds"] = seconds
    return record


def _summary(report):
    lines = [f"fast_unet GPU check{' (dry run, CPU)' if report['dry'] else ''}: {report['date']} "
             f"commit {report['commit']}; total {report['total_s']} s"]
    for name, rec in report["steps"].items():
        lines.append(f"{name}: {rec['status']} ({rec['seconds']} s)" + (f" {rec['reason']}" if "reason" in rec else ""))
        if name == "env" and rec["status"] == "ok":
            lines.append(f"    {rec['device']}; torch {rec['torch']}, triton {rec['triton']}; backends {rec['backends']}")
        if name in ("defaults", "compiled") and rec["status"] == "ok":
            for precision, modes in rec["ms"].items():
                for mode, row in modes.items():
                    lines.append(f"    B={rec['batch']} {rec['size']}x{rec['size']} {precision} {mode}: "
                                 + ", ".join(f"{k} {v}" + ("x" if "/" in k else " ms") for k, v in row.items()))
        if name == "attention" and rec["status"] == "ok":
            for r in rec["rows"]:
                lines.append(f"    {r['block']} {r['shape']}: " + ", ".join(f"{k} {v} ms" for k, v in r["ms"].items())
                             + f"; sdpa / one-pass {r['sdpa / one-pass']}x")
        if name == "graphs" and rec["status"] == "ok":
            lines.append(f"    captured={rec['captured']} forward diff {rec['forward_max_abs_diff']:.3g}, "
                         f"train grad rel diff {rec['train_grad_max_rel_diff']:.3g}")
        if name == "loop" and rec["status"] == "ok":
            for r in rec["rows"]:
                lines.append(f"    B={rec['batch']} {rec['size']}x{rec['size']} {r['variant']}: {r['ms_per_step']:.2f} "
                             f"ms/step, {r['images_per_s']:.1f} images/s, {r['baseline plain loop / this']}x")
            lines.append(f"    captured={rec['captured']} graph vs eager: loss rel diff "
                         f"{rec['graph_loss_max_rel_diff']:.3g}, weights {rec['graph_weight_max_rel_diff']:.3g}")
        if name == "tune" and rec["status"] == "ok":
            for mode, r in rec["rows"].items():
                lines.append(f"    {mode}: untuned {r['untuned_ms']} ms, tuned {r['tuned_ms']} ms "
                             f"({r['untuned / tuned']}x); tuning took {r['tuning_first_call_s']} s on the first call")
        if name == "sampling" and rec["status"] == "ok":
            for r in rec["rows"]:
                lines.append(f"    B={rec['batch']} {r['model']}: {r['ms_per_step']:.2f} ms/step, "
                             f"1000 steps {r['ddpm_1000_s']:.1f} s")
        if name == "tests" and rec["status"] == "ok":
            lines.append(f"    {rec['counts']}; skipped for: {rec['skip_reasons'][:6]}")
        if name == "ops" and rec["status"] == "ok":
            lines.extend(f"    {k}: {v}" for k, v in rec.get("best_vs_eager", {}).items())
        if rec["status"] in ("failed", "timeout"):
            lines.append("    " + str(rec.get("log_tail", rec))[-600:].replace("\n", "\n    "))
    lines.append("all steps passed" if report["passed"] else "SOME STEPS DID NOT PASS")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "gpu_check_out"))
    p.add_argument("--dry", action="store_true", help="every step's code path on the CPU, tiny sizes")
    p.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of " + ",".join(STEPS))
    p.add_argument("--budget", type=int, default=TOTAL_S, help="seconds for the whole check (default 420)")
    p.add_argument("--step", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)

    if args.step:  # one step, in this process
        result = globals()[f"step_{args.step}"](args.dry)
        with open(os.path.join(out_dir, f"{args.step}.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        return 0

    start = time.time()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "?"
    report = {"dry": args.dry, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit,
              "steps": {}}
    wanted = [s for s in args.steps.split(",") if s]
    for name in STEPS:
        if name not in wanted:
            report["steps"][name] = {"status": "skipped", "reason": "not asked for (--steps)", "seconds": 0}
            continue
        left = args.budget - (time.time() - start)
        # the interpreter runs every Triton kernel of a training step, forward and backward, at several ms per
        # loop iteration and program (the graph step's two steps took 210 s on an idle AMD EPYC core): the
        # dry run has no budget, and its limits only catch a hang
        limit = STEPS[name] * (10 if args.dry else 1)
        if not args.dry and left < 15:
            report["steps"][name] = {"status": "skipped", "reason": f"the {args.budget} s budget is spent", "seconds": 0}
            continue
        if not args.dry:
            limit = int(min(limit, left))
        print(f"[gpu_check] {name} (limit {limit} s)", file=sys.stderr, flush=True)
        report["steps"][name] = _run_step(name, args.dry, out_dir, limit)
    report["total_s"] = round(time.time() - start, 1)
    report["passed"] = all(r["status"] == "ok" or "--steps" in r.get("reason", "") for r in report["steps"].values())
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    text = _summary(report)
    with open(os.path.join(out_dir, "summary.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
