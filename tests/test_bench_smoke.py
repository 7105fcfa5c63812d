"""`python -m bench` runs end to end and writes its JSON (tiny shapes; the real run is `make bench`)."""
import json
import subprocess
import sys


def test_bench_runs_and_writes_json(tmp_path):
    out = tmp_path / "b.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--batch", "1", "--size", "16", "--warmup", "1", "--repeats", "1",
         "--quiet", "--json", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data["models"]) == {"reference", "baseline", "fast_unet"}
    for m in data["models"].values():
        for mode in ("forward", "train"):
            assert m[mode]["median_ms"] > 0 and m[mode]["peak_mib"] is not None
    assert "| fast_unet | train |" in proc.stdout


def test_bench_sample_runs_and_writes_json(tmp_path):
    """`python -m bench.sample` (what `python -m bench --sample` runs) at tiny shapes: every loop and the
    training step are timed, totals are per-step times x steps."""
    out = tmp_path / "s.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.sample", "--batch", "1", "--size", "16", "--steps-timed", "1", "--rounds", "1",
         "--quiet", "--json", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [r["model"] for r in data["rows"]] == ["seed loop", "baseline loop", "fast_unet"]
    for r in data["rows"]:
        assert r["ms_per_step"] > 0
        assert abs(r["ddpm_1000_s"] - 999 * r["ms_per_step"] / 1e3) < 1e-9 * r["ddpm_1000_s"] + 1e-12
    assert data["train"]["images_per_s"] > 0
    assert "| fast_unet | sample_fast |" in proc.stdout
