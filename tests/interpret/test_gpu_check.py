"""The one-shot GPU check (scripts/gpu_check.py) kept runnable without a GPU: its ``--dry`` mode runs every
step's code path on CPU tensors at tiny sizes (Triton under the interpreter in the steps that check kernels), and
must pass and report every step."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_check_dry_runs_every_step(tmp_path):
    env = dict(os.environ, FAST_UNET_BACKEND="auto")
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000)
    summary = (tmp_path / "summary.txt").read_text() if (tmp_path / "summary.txt").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["install", "env", "defaults", "attention", "compiled", "graphs", "loop", "tune", "sampling",
                           "tests", "ops", "sweep"]
    assert all(s["status"] == "ok" for s in steps.values()), summary
    ms = steps["defaults"]["ms"]
    for precision in ("autocast", "bf16"):
        for mode in ("forward", "train"):
            row = ms[precision][mode]
            assert {"baseline", "fast_unet", "fast_unet unfused"} <= set(row) and row["fast_unet"] > 0
    ran = steps["defaults"]["backends_ran"]["autocast fast_unet forward"]
    assert ran["conv3x3"] == "triton", ran
    assert steps["defaults"]["backends_ran"]["autocast fast_unet unfused forward"]["conv3x3"] == "eager"
    # the steps that measure take the CPU's backends in the dry run, not the interpreter (gpu_check.DRY_INTERPRETED)
    assert steps["compiled"]["backends_ran"]["autocast fast_unet forward"]["conv3x3"] != "triton"
    assert [r["block"] for r in steps["attention"]["rows"]] == [f"sa{i}" for i in range(1, 7)]
    assert all(set(r["ms"]) == {"one-pass", "deterministic", "sdpa"} for r in steps["attention"]["rows"])
    assert steps["compiled"]["ms"]["bf16"]["train"]["compiled"] > 0
    assert steps["graphs"]["captured"] is False and steps["graphs"]["train_grad_max_rel_diff"] <= 1e-2
    loop = steps["loop"]
    assert [r["variant"] for r in loop["rows"]] == ["fast_unet CLI step, graphed", "fast_unet CLI step, --no-graph",
                                                    "baseline plain loop", "baseline compiled plain loop"]
    assert all(r["images_per_s"] > 0 for r in loop["rows"]) and loop["captured"] is False
    assert loop["graph_loss_max_rel_diff"] == 0 and loop["graph_weight_max_rel_diff"] == 0  # both eager here
    tune = steps["tune"]["rows"]
    assert set(tune) == {"forward", "train"} and all(r["tuned_ms"] > 0 and r["tuning_first_call_s"] > 0 for r in tune.values())
    assert [r["model"] for r in steps["sampling"]["rows"]] == ["seed loop", "baseline loop", "fast_unet"]
    # on the CPU every GPU test skips, and the report says why
    counts = steps["tests"]["counts"]
    assert counts["tests"] > 50 and counts["skipped"] == counts["tests"] and steps["tests"]["skip_reasons"]
    assert steps["ops"]["rows"] >= 18  # every op, forward and forward+backward, each on triton and eager
    sweep = json.loads((tmp_path / "bench_sweep.json").read_text())
    cells = sweep["points"][0]["cells"]
    assert set(cells) == {"baseline", "fast_unet"} and cells["fast_unet"]["train"]["median_ms"] > 0, cells
    assert "defaults:" in summary and "all steps passed" in summary
