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
