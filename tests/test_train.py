"""python -m fast_unet.train on the CPU: exact resume, Ctrl-C, files, errors, torchrun (gloo). Tiny sizes."""
import os
import re
import subprocess
import sys

import pytest
import torch

from fast_unet import UNet
from fast_unet import train
from fast_unet.reference import UNet as RefUNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--image-size", "16", "--batch-size", "2", "--embedded-size", "16", "--no-progress", "--seed", "3", "--threads", "1"]


def _run(out, steps, *extra, on_step=None):
    return train.main(TINY + ["--out", str(out), "--steps", str(steps), *extra], on_step=on_step)


def _ckpt(d):
    return torch.load(os.path.join(d, "checkpoint.pt"), weights_only=False)


def _same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _same_opt(a, b):
    for k, s in a["state"].items():
        for name, v in s.items():
            assert torch.equal(v, b["state"][k][name]), (k, name)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    d = tmp_path_factory.mktemp("straight")
    _run(d, 2)
    return d


def test_resume_is_bit_exact(straight, tmp_path):
    _run(tmp_path, 1)
    _run(tmp_path, 2, "--resume", str(tmp_path))
    a, b = _ckpt(straight), _ckpt(tmp_path)
    assert a["step"] == b["step"] == 2
    _same_state(a["model"], b["model"])
    _same_state(a["ema"], b["ema"])
    _same_opt(a["optimizer"], b["optimizer"])
    lines = open(tmp_path / "losses.csv").read().splitlines()
    assert len(lines) == 3 and lines[0].startswith("step,loss")
    assert [l.split(",")[:2] for l in lines] == [l.split(",")[:2] for l in open(straight / "losses.csv").read().splitlines()]


def test_ctrl_c_writes_a_checkpoint_that_resumes(straight, tmp_path):
    def interrupt(step):
        if step == 1:
            raise KeyboardInterrupt
    r = _run(tmp_path, 2, on_step=interrupt)
    assert r["interrupted"] and _ckpt(tmp_path)["step"] == 1
    _run(tmp_path, 2, "--resume", str(tmp_path))
    _same_state(_ckpt(straight)["model"], _ckpt(tmp_path)["model"])


def test_files_load_strict_into_both_models(straight):
    for name in ("model.pt", "ema.pt"):
        sd = torch.load(straight / name, weights_only=True)
        UNet(device="cpu").load_state_dict(sd, strict=True)
        RefUNet(device="cpu").load_state_dict(sd, strict=True)


def test_sample_grid_written(tmp_path):
    _run(tmp_path, 1, "--sample-every", "1", "--sample-steps", "2", "--sample-n", "2")
    from PIL import Image
    im = Image.open(tmp_path / "samples" / "step_000001.png")
    assert im.size[0] > 16


def test_image_folder_skips_non_images(tmp_path):
    from PIL import Image
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        Image.new("RGB", (40 + i, 30), (40 * i, 100, 200)).save(data / f"{i}.png")
    (data / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "fast_unet.train", *TINY, "--data", str(data), "--out", str(out),
                        "--steps", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "skipped 1 non-image file" in r.stdout
    assert "3 images of 16x16" in r.stdout
    assert (out / "model.pt").exists()


@pytest.mark.parametrize("extra,message", [
    (["--image-size", "20"], "multiple of 8"),
    (["--data", "/nonexistent/folder"], "not a folder"),
    (["--resume", "{tmp}"], "no checkpoint.pt"),
    (["--out", "{tmp}/file/sub"], "not writable"),
    (["--data", "{tmp}"], "no readable image"),
])
def test_clear_errors(tmp_path, extra, message):
    (tmp_path / "file").write_text("x")
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    args = TINY + ["--steps", "1", "--out", str(tmp_path / "o")] + extra
    with pytest.raises(train.TrainError, match=message):
        train.main(args)
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def test_torchrun_two_gloo_ranks_match_single_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # SGD: the update is linear in the gradient, so the all-reduce's summation order shows as float32 rounding
    # only (AdamW's first steps, g / sqrt(v), amplify it for near-zero gradients; its losses still match).
    common = ["--optimizer", "sgd", "--lr", "0.05", "--image-size", "16", "--embedded-size", "32", "--steps", "3", "--no-progress", "--device", "cpu", "--threads", "1"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "fast_unet.train", *common, "--batch-size", "4",
                        "--out", str(tmp_path / "ddp")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "global batch 8 (2 x 4), lr 0.05" in r.stdout
    m = re.search(r"max \|difference\| from rank 0: (\S+)", r.stdout)
    assert m and float(m.group(1)) == 0.0, r.stdout
    train.main(common + ["--batch-size", "8", "--out", str(tmp_path / "single")])
    a = torch.load(tmp_path / "ddp" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "single" / "model.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    loss = lambda d: [float(l.split(",")[1]) for l in open(tmp_path / d / "losses.csv").read().splitlines()[1:]]
    assert loss("ddp") == pytest.approx(loss("single"), rel=1e-5)


# -- python -m fast_unet.sample ---------------------------------------------------------------------------

def test_sample_cli_writes_grid(straight, tmp_path):
    from PIL import Image
    from fast_unet import sample
    for w in ("ema.pt", "model.pt", "checkpoint.pt"):
        out = tmp_path / f"{w}.png"
        sample.main(["--weights", str(straight / w), "--n", "2", "--steps", "2", "--image-size", "16",
                     "--out", str(out), "--device", "cpu"])
        assert Image.open(out).size == (2 * 18 + 2, 18 + 2)


def test_sample_cli_refuses_other_architecture(tmp_path):
    from fast_unet import sample
    w = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 3).state_dict(), w)
    with pytest.raises(sample.SampleError, match="missing .*inc.conv1.0.weight.*unexpected 2: weight, bias"):
        sample.main(["--weights", str(w), "--out", str(tmp_path / "g.png"), "--device", "cpu"])
    sd = UNet(device="cpu").state_dict()
    sd["outc.weight"] = torch.zeros(4, 64, 1, 1)
    torch.save(sd, w)
    with pytest.raises(sample.SampleError, match="shape mismatch 1: outc.weight"):
        sample.main(["--weights", str(w), "--out", str(tmp_path / "g.png"), "--device", "cpu"])
    assert not (tmp_path / "g.png").exists()
    r = subprocess.run([sys.executable, "-m", "fast_unet.sample", "--weights", str(tmp_path / "nope.pt")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no such file" in r.stderr
