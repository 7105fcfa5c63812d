"""Smoke tests of the benchmark commands, each a different command at tiny shapes (the real runs are
`make bench`, `python -m bench --sweep`, `python -m bench.ops`, `python -m bench.estimate`):

- test_single_point_bench: `python -m bench`, one point, every model timed and its memory measured;
- test_sampling_bench: `python -m bench.sample`, the sampling loops and the training step;
- test_precisions_bench: `python -m bench --precisions`, float32 / bf16 autocast / bf16 cells, tuned too;
- test_sweep_*: `python -m bench --sweep`, several points, cells out of limits reported, plots written;
- test_ops_bench: `python -m bench.ops`, every dispatched op against its eager twin;
- test_gpu_estimate: `python -m bench.estimate`, the on-paper H200 estimate.
"""
import json
import math
import subprocess
import sys

import pytest

PNG = b"\x89PNG\r\n\x1a\n"


def _run(args, timeout=300, env=None):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_single_point_bench(tmp_path):
    """`python -m bench` at one point times every model, measures each one's peak memory in a fresh
    process, and states the best measured matmul rate it compares against."""
    out = tmp_path / "b.json"
    proc = _run(["-m", "bench", "--batch", "1", "--size", "16", "--warmup", "1", "--repeats", "1",
                 "--quiet", "--json", str(out)])
    data = json.loads(out.read_text())
    assert set(data["models"]) == {"reference", "baseline", "fast_unet"}
    for m in data["models"].values():
        for mode in ("forward", "train"):
            assert m[mode]["median_ms"] > 0 and m[mode]["peak_mib"] is not None
            assert m[mode]["of_matmul_rate"] == pytest.approx(m[mode]["gflops"] / data["matmul_gflops"])
    assert data["matmul_samples"] > 5  # the rate is the best of samples taken during the timing rounds too
    assert "| fast_unet | train |" in proc.stdout
    assert "best measured float32 matmul rate" in proc.stdout and "B=1, 16x16, float32" in proc.stdout


def test_sampling_bench(tmp_path):
    """`python -m bench.sample` (what `python -m bench --sample` runs) at tiny shapes: every loop and the
    training step are timed, totals are per-step times x steps."""
    out = tmp_path / "s.json"
    proc = _run(["-m", "bench.sample", "--batch", "1", "--size", "16", "--steps-timed", "1", "--rounds", "1",
                 "--quiet", "--json", str(out)])
    data = json.loads(out.read_text())
    assert [r["model"] for r in data["rows"]] == ["seed loop", "baseline loop", "fast_unet"]
    for r in data["rows"]:
        assert r["ms_per_step"] > 0
        assert abs(r["ddpm_1000_s"] - 999 * r["ms_per_step"] / 1e3) < 1e-9 * r["ddpm_1000_s"] + 1e-12
    assert data["train"]["images_per_s"] > 0
    assert "| fast_unet | sample_fast |" in proc.stdout


def test_precisions_bench(tmp_path):
    """`python -m bench --precisions --tune`: baseline, fast_unet and the tuned fast_unet in every precision, in one
    run, with the ratios the table states computed from the medians, and the tuning's cost."""
    out = tmp_path / "p.json"
    env = {**__import__("os").environ, "FAST_UNET_CACHE_DIR": str(tmp_path / "cache")}
    proc = _run(["-m", "bench.precision", "--batch", "1", "--size", "16", "--warmup", "0", "--repeats", "1",
                 "--modes", "forward,train", "--tune", "--quiet", "--json", str(out)], env=env)
    data = json.loads(out.read_text())
    for mode in ("forward", "train"):
        precs = data["cells"][mode]
        assert list(precs) == ["float32", "autocast-bfloat16", "bfloat16"]
        for prec, row in precs.items():
            assert list(row) == ["baseline", "fast_unet", "fast_unet_tuned"]
            f32 = precs["float32"]["fast_unet"]["median_ms"]
            assert row["fast_unet"]["vs_baseline"] == round(row["baseline"]["median_ms"] / row["fast_unet"]["median_ms"], 3)
            assert row["fast_unet"]["vs_fast_unet_float32"] == round(f32 / row["fast_unet"]["median_ms"], 3)
            assert "vs_untuned" in row["fast_unet_tuned"]
            assert data["tuning"][f"{prec} {mode}"]["first_call_s"] > 0
    assert "| forward | autocast-bfloat16 | fast_unet |" in proc.stdout
    assert (tmp_path / "cache").is_dir()


def test_sweep_times_every_point_and_draws_the_plots(tmp_path):
    """`python -m bench --sweep` over two sizes and two batches (three points): every cell timed, the
    exponents fitted, the JSON and both PNGs written."""
    out = tmp_path / "sweep.json"
    proc = _run(["-m", "bench", "--sweep", "--sizes", "8,16", "--batches", "1,2", "--sweep-size", "8",
                 "--models", "baseline,fast_unet", "--warmup", "0", "--repeats", "1", "--no-memory", "--quiet",
                 "--json", str(out), "--plots", str(tmp_path)])
    data = json.loads(out.read_text())
    assert [(p["batch"], p["height"], p["width"], p["axes"]) for p in data["points"]] == [
        (1, 8, 8, ["batch", "size"]), (1, 16, 16, ["size"]), (2, 8, 8, ["batch"])]
    for p in data["points"]:
        for m in ("baseline", "fast_unet"):
            for mode in ("forward", "train"):
                assert p["cells"][m][mode]["median_ms"] > 0
    ex = {(e["axis"], e["model"], e["mode"], e["quantity"]): e["exponent"] for e in data["exponents"]}
    assert ex[("size", "fast_unet", "train", "time")] is not None and ex[("size", "fast_unet", "train", "memory")] is None
    for name in ("sweep_size.png", "sweep_batch.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert "Fitted exponents" in proc.stdout and "| 2 | 8x8 | 64 |" in proc.stdout


def test_sweep_reports_a_cell_past_its_limit_and_goes_on(tmp_path):
    """A cell past the time limit is reported as such, not dropped, and the sweep still writes its
    results (a limit of 0.5 s: the memory child cannot even start)."""
    out = tmp_path / "sweep.json"
    proc = _run(["-m", "bench", "--sweep", "--sizes", "8", "--batches", "1", "--models", "fast_unet",
                 "--modes", "forward", "--cell-limit", "0.5", "--warmup", "0", "--repeats", "1", "--quiet",
                 "--json", str(out), "--plots", ""])
    cell = json.loads(out.read_text())["points"][0]["cells"]["fast_unet"]["forward"]
    assert cell == {"error": "time limit"}
    assert "time limit" in proc.stdout


def test_memory_child_reports_out_of_memory():
    """Past its address-space cap, a step is reported as out of memory (the reference at 32x32 needs a
    4 x 1024 x 1024 attention matrix, 16 MiB, twice, more than the 8 MiB allowed)."""
    from bench import core

    assert core.measure_memory("reference", "forward", 1, 32, 32, "float32", "cpu", limit_bytes=8 * 2**20) == (
        None, "out of memory")


def test_fit_exponent():
    from bench.sweep import fit_exponent

    xs = [256, 1024, 4096]
    assert fit_exponent(xs, [3 * x**2 for x in xs]) == pytest.approx(2.0)
    assert fit_exponent(xs, [5 + 0 * x for x in xs]) == pytest.approx(0.0)
    assert fit_exponent([64], [1.0]) is None


def test_ops_bench(tmp_path):
    """`python -m bench.ops` on the CPU: every dispatched op, at the model's shapes, on its eager twin and
    on the extension where it has the op; Triton stated as needing a GPU; the plot written."""
    from fast_unet import dispatch

    out, png = tmp_path / "ops.json", tmp_path / "ops.png"
    proc = _run(["-m", "bench.ops", "--sizes", "8,16", "--batch", "1", "--repeats", "1", "--warmup", "0",
                 "--directions", "fwd", "--quiet", "--json", str(out), "--plot", str(png)])
    data = json.loads(out.read_text())
    assert {r["op"] for r in data["rows"]} == set(dispatch.OPS)
    for r in data["rows"]:
        c = r["results"]["eager"]["fwd"]
        assert c["ms"] > 0 and r["bytes"] > 0 and math.isclose(c["gbs"], r["bytes"] / c["ms"] / 1e6)
    conv = [r for r in data["rows"] if r["op"] == "conv3x3"]
    assert conv[1]["flops"] > conv[0]["flops"] > 0  # 16x16 does more work than 8x8
    if dispatch.backend_status()["ext"] is None:
        assert "ms" in next(r for r in data["rows"] if r["op"] == "group_norm_relu")["results"]["ext"]["fwd"]
    assert "triton" not in data["backends"] and any("need a GPU" in n for n in data["notes"])
    assert png.read_bytes()[:8] == PNG
    assert "| conv3x3 | 16 | fwd | 20 |" in proc.stdout


def test_gpu_estimate(tmp_path):
    """`python -m bench.estimate` at B=1, 16x16: fast_unet's launches and the baseline's ops with their
    bytes, FLOPs, exponentials and loop instructions (compiled for sm_90 unless cached), the H200 time of
    each step, and the ratio."""
    out = tmp_path / "e.json"
    proc = _run(["-m", "bench.estimate", "--batch", "1", "--size", "16", "--sizes", "", "--batches", "",
                 "--per-build", "--quiet", "--json", str(out)])
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    fu, base = row["models"]["fast_unet"], row["models"]["baseline"]
    # the same math: the forward's FLOPs and exponentials agree to the time embedding's few
    assert fu["forward"]["flops"] == pytest.approx(base["forward"]["flops"], rel=1e-3)
    assert fu["forward"]["launches"] < base["forward"]["launches"]
    for r in (fu, base):
        for step in ("forward", "train"):
            s = r[step]
            assert s["est_s"] >= s["launches"] * data["constants"]["launch_s"] and s["bytes"] > 0
            # the graphed step: the same kernels, graph_launch_s each in place of launch_s
            c = data["constants"]
            assert s["graph_est_s"] == pytest.approx(s["est_s"] - s["launches"] * (c["launch_s"] - c["graph_launch_s"]))
            # the loops' instructions: fast_unet's Triton loops, the baseline's SDPA at fast_unet's floor
            assert s["insts"] > 0 and s["attention_s"] > 0 and s["insts_from"], s["insts_from"]
    for step in ("forward", "train"):
        # every fast_unet launch with a loop compiles to a build of the compile report: none goes uncounted
        assert fu[step]["no_issue"] == [], fu[step]["no_issue"]
        # --per-build: those launches by build, each estimate at least each of its ceilings' times
        builds = fu[step]["builds"]
        assert builds and sum(b["calls"] for b in builds) < fu[step]["launches"]
        assert sum(b["issue_s"] for b in builds) == pytest.approx(fu[step]["insts"] / data["constants"]["issue_per_s"])
        for b in builds:
            assert b["est_s"] >= max(b["issue_s"], b["math_s"], b["exp_s"], b["memory_s"]) > 0, b
        assert f"fast_unet, {step}, B=1, 16x16: Triton launches by build" in proc.stdout
    assert "floor" in base["train"]["insts_from"]
    assert "hbm_bytes_per_s" in proc.stdout and "| 1 | 16x16 | fast_unet | forward |" in proc.stdout
    assert "issue-bound ms" in proc.stdout and "issue_per_s" in proc.stdout
    assert "graphed vs baseline" in proc.stdout and "graph_launch_s" in proc.stdout
