"""python -m fast_unet.sample: the weight formats, refused files, batches, bad flags (CPU, 8x8, 1-2 steps)."""
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from fast_unet import UNet, sample
from fast_unet.files import save_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--image-size", "8", "--steps", "1", "--device", "cpu", "--threads", "1", "--no-progress"]


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random-init UNet's state_dict as a plain .pt, as .safetensors and inside a trainer-style dict."""
    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    sd = UNet(device="cpu").state_dict()
    torch.save(sd, d / "seed.pt")
    save_safetensors(sd, str(d / "ema.safetensors"))
    torch.save({"ema": sd, "model": {}}, d / "checkpoint.pt")
    return d


def _cli(capsys, *argv):
    rc = sample.cli(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(rc, err):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_all_weight_formats_sample_the_same_images(weights, tmp_path, capsys):
    grids = []
    for w in ("seed.pt", "ema.safetensors", "checkpoint.pt"):
        out = tmp_path / f"{w}.png"
        rc, stdout, err = _cli(capsys, "--weights", str(weights / w), "--n", "2", "--out", str(out), *FAST)
        assert rc == 0, err
        assert f"wrote {out}: 2 images 8x8" in stdout
        grids.append(Image.open(out).tobytes())
    assert grids[0] == grids[1] == grids[2]


def test_payload_weights_are_refused_and_do_not_run(tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"ema": {"inc.conv1.0.weight": Payload(marker)}}, tmp_path / "ema.pt")
    r = subprocess.run([sys.executable, "-m", "fast_unet.sample", "--weights", str(tmp_path / "ema.pt"),
                        "--out", str(tmp_path / "g.png"), *FAST], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    line = _one_line_error(r.returncode, r.stderr)
    assert "refused by the safe loader" in line and "posix.system" in line
    assert not marker.exists() and not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("damage", ["empty", "truncated_pt", "truncated_safetensors"])
def test_damaged_weights_one_line(weights, tmp_path, capsys, damage):
    if damage == "empty":
        w = tmp_path / "w.pt"
        w.write_bytes(b"")
    elif damage == "truncated_pt":
        w = tmp_path / "w.pt"
        w.write_bytes((weights / "seed.pt").read_bytes()[:4096])
    else:
        w = tmp_path / "w.safetensors"
        w.write_bytes((weights / "ema.safetensors").read_bytes()[:4096])
    line = _one_line_error(*_cli(capsys, "--weights", str(w), "--out", str(tmp_path / "g.png"), *FAST)[::2])
    assert "damaged" in line and str(w) in line


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_weights_are_refused_naming_the_tensor(weights, tmp_path, capsys, bad):
    sd = torch.load(weights / "seed.pt", weights_only=True)
    sd["up2.conv.conv2.0.weight"][1, 2, 0, 0] = float(bad)
    torch.save(sd, tmp_path / "w.pt")
    line = _one_line_error(*_cli(capsys, "--weights", str(tmp_path / "w.pt"), "--out", str(tmp_path / "g.png"),
                                 *FAST)[::2])
    assert "tensor up2.conv.conv2.0.weight holds" in line
    assert ("1 NaN and 0 Inf" if bad == "nan" else "0 NaN and 1 Inf") in line
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("argv,message", [
    (["--n", "0"], "--n must be >= 1, got 0"),
    (["--n", "-1"], "--n must be >= 1, got -1"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--noise-steps", "1"], "--noise-steps must be >= 2"),
    (["--out", "{tmp}/missing/g.png"], "the folder '{tmp}/missing' does not exist"),
    (["--out", "{tmp}/g.xyz"], "unknown image extension .xyz"),
    (["--out", "{tmp}/grid"], "no image extension"),
    (["--out", "{tmp}"], "is a folder"),
    (["--out-dir", "{tmp}/file/sub"], "--out-dir '{tmp}/file/sub' cannot be created"),
    (["--device", "gpu"], "--device 'gpu' is not a device"),
])
def test_bad_flags_are_refused_before_any_work(tmp_path, capsys, monkeypatch, argv, message):
    def no_work(path):
        raise AssertionError("weights loaded before the flags were checked")
    monkeypatch.setattr(sample, "load_weights", no_work)
    (tmp_path / "file").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    base = ["--weights", "w.pt", "--out", str(tmp_path / "g.png"), *FAST]
    line = _one_line_error(*_cli(capsys, *base, *argv)[::2])
    assert message.replace("{tmp}", str(tmp_path)) in line


def test_jpg_out_is_a_jpeg(weights, tmp_path, capsys):
    rc, _, err = _cli(capsys, "--weights", str(weights / "seed.pt"), "--n", "1", "--out", str(tmp_path / "g.jpg"),
                      *FAST)
    assert rc == 0, err
    with Image.open(tmp_path / "g.jpg") as im:
        assert im.format == "JPEG"


def test_batches_grid_as_they_finish_out_dir_and_progress(weights, tmp_path, capsys, monkeypatch):
    from fast_unet.data import Grid
    calls, saves = [], []
    real_sample, real_save = sample.Diffusion.sample_fast, Grid.save

    def counting_sample(self, model, n, **kw):
        calls.append(n)
        return real_sample(self, model, n, **kw)

    def counting_save(self, path):
        saves.append(self.filled)
        return real_save(self, path)

    monkeypatch.setattr(sample.Diffusion, "sample_fast", counting_sample)
    monkeypatch.setattr(Grid, "save", counting_save)
    monkeypatch.setattr(sample, "GRID_EVERY_S", 0.0)
    argv = ["--weights", str(weights / "seed.pt"), "--n", "5", "--batch-size", "2",
            "--out", str(tmp_path / "g.png"), "--out-dir", str(tmp_path / "imgs"), *[a for a in FAST if a != "--no-progress"]]
    rc, out, err = _cli(capsys, *argv)
    assert rc == 0, err
    assert calls == [2, 2, 1] and saves == [2, 4, 5]
    assert "5/5" in err and "img" in err  # the progress bar counts images
    assert sorted(os.listdir(tmp_path / "imgs")) == [f"{i:06d}.png" for i in range(5)]
    grid = Image.open(tmp_path / "g.png")
    assert grid.size == (3 * 10 + 2, 2 * 10 + 2)
    tile = grid.crop((2 + 10 * 1, 2 + 10 * 1, 2 + 10 * 1 + 8, 2 + 10 * 1 + 8))  # image 4: row 1, column 1
    assert tile.tobytes() == Image.open(tmp_path / "imgs" / "000004.png").convert("RGB").tobytes()
    rc, _, err = _cli(capsys, *argv, "--no-progress")
    assert rc == 0 and "img" not in err
