"""python -m fast_unet.train on the CPU: exact resume, Ctrl-C, files, errors, torchrun (gloo); refused and
damaged checkpoints, resume with other flags, a kill or a full disk during a save, two trainers on one folder,
a non-finite loss. Tiny sizes."""
import csv
import errno
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from fast_unet import UNet
from fast_unet import files
from fast_unet import train
from fast_unet.reference import UNet as RefUNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--image-size", "16", "--batch-size", "2", "--embedded-size", "16", "--no-progress", "--seed", "3", "--threads", "1"]


def _run(out, steps, *extra, on_step=None):
    return train.main(TINY + ["--out", str(out), "--steps", str(steps), *extra], on_step=on_step)


def _ckpt(d, name="checkpoint.pt"):
    return torch.load(os.path.join(d, name), weights_only=True)


def _steps(d):
    with open(os.path.join(d, "losses.csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "loss", "lr", "seconds"]
    return rows[1:]


def _cli(capsys, *argv):
    """``train.cli``'s exit code, stdout, and its stderr, which must be one ``error:`` line when rc is 2."""
    rc = train.cli(list(argv))
    out, err = capsys.readouterr()
    if rc == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return rc, out, err.strip()


def _leftovers(d):
    """Partial writes and the lock: none may remain after a run ends, whatever ended it."""
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp") or p.name == ".lock")


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
    from safetensors.torch import load_file
    for name in ("model", "ema"):
        sd = torch.load(straight / f"{name}.pt", weights_only=True)
        st = load_file(straight / f"{name}.safetensors")
        _same_state(sd, st)
        for w in (sd, st):
            UNet(device="cpu").load_state_dict(w, strict=True)
            RefUNet(device="cpu").load_state_dict(w, strict=True)
    assert _leftovers(straight) == []


def test_checkpoint_holds_only_what_the_safe_loader_reads(straight):
    c = _ckpt(straight)  # weights_only=True
    assert c["step"] == 2 and isinstance(c["args"], dict)
    assert c["args"]["lr"] == 3e-4 and c["args"]["optimizer"] == "adamw" and c["args"]["world_size"] == 1
    assert all(isinstance(v, torch.Tensor) for v in (c["rng"]["torch"], c["rng"]["noise"], c["rng"]["python"]["state"]))


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
    assert "skipped 1 non-image file(s) in " + str(data) + ": notes.txt (not an image)" in r.stdout
    assert "3 images of 16x16" in r.stdout
    assert (out / "model.pt").exists()


@pytest.mark.parametrize("extra,message", [
    (["--image-size", "20"], "multiple of 8"),
    (["--data", "/nonexistent/folder"], "not a folder"),
    (["--resume", "{tmp}"], "no checkpoint.pt"),
    (["--out", "{tmp}/file/sub"], "not writable"),
    (["--data", "{tmp}"], "no readable image"),
    (["--steps", "-1"], "--steps must be >= 0"),
    (["--lr", "nan"], "--lr must be finite"),
    (["--noise-steps", "1"], "--noise-steps must be >= 2"),
    (["--device", "gpu"], "--device 'gpu' is not a device"),
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


# -- resume: refused, damaged, other flags -----------------------------------------------------------------

class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_a_payload_checkpoint_without_running_it(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": Payload(marker), "step": 1}, run / "checkpoint.pt")
    rc, _, err = _cli(capsys, *TINY, "--resume", str(run), "--steps", "2")
    assert rc == 2 and "refused by the safe loader" in err and "posix.system" in err
    assert not marker.exists()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt"]


def test_resume_applies_a_new_lr_and_keeps_it(tmp_path, capsys):
    _run(tmp_path, 1)
    capsys.readouterr()
    _run(tmp_path, 2, "--resume", str(tmp_path), "--lr", "0.01")
    out = capsys.readouterr().out
    assert "lr 0.0003 -> 0.01 from step 1" in out and "lr 0.01," in out
    c = _ckpt(tmp_path)
    assert c["args"]["lr"] == 0.01 and all(g["lr"] == 0.01 for g in c["optimizer"]["param_groups"])
    _run(tmp_path, 3, "--resume", str(tmp_path))  # no --lr: the checkpoint's
    out = capsys.readouterr().out
    assert "lr 0.01 ->" not in out and "lr 0.01," in out
    assert [r[2] for r in _steps(tmp_path)] == ["0.0003", "0.01", "0.01"]
    assert all(g["lr"] == 0.01 for g in _ckpt(tmp_path)["optimizer"]["param_groups"])


def test_resume_refuses_another_optimizer(straight, tmp_path, capsys):
    rc, _, err = _cli(capsys, *TINY, "--resume", str(straight), "--optimizer", "sgd", "--out", str(tmp_path),
                      "--steps", "3")
    assert rc == 2 and "--optimizer sgd: the checkpoint was trained with adamw" in err
    assert "resume with --optimizer adamw" in err
    assert not (tmp_path / "checkpoint.pt").exists() and _leftovers(tmp_path) == []


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    _run(tmp_path, 2, "--save-every", "1")
    assert _ckpt(tmp_path)["step"] == 2 and _ckpt(tmp_path, "checkpoint.prev.pt")["step"] == 1
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100_000])  # truncated, as by a copy cut short
    capsys.readouterr()
    r = _run(tmp_path, 3, "--resume", str(tmp_path), "--save-every", "0")
    out = capsys.readouterr().out
    assert re.search(r"checkpoint.pt' is damaged .*; resuming from \S*checkpoint.prev.pt \(step 1\) instead", out)
    assert "losses.csv: removed 1 row(s) after step 1" in out
    assert r["step"] == 3 and _ckpt(tmp_path)["step"] == 3
    assert _ckpt(tmp_path, "checkpoint.prev.pt")["step"] == 1  # the damaged file was replaced, not kept
    assert [r[0] for r in _steps(tmp_path)] == ["1", "2", "3"]
    # A save killed between its two renames leaves checkpoint.prev.pt only.
    ckpt.unlink()
    _run(tmp_path, 2, "--resume", str(tmp_path))
    assert "is missing" in capsys.readouterr().out and _ckpt(tmp_path)["step"] == 2


def test_damaged_checkpoint_without_a_previous_one_says_so(tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    rc, _, err = _cli(capsys, *TINY, "--resume", str(tmp_path), "--steps", "2")
    assert rc == 2 and "checkpoint.pt' is damaged: the file is empty; there is no checkpoint.prev.pt" in err


def test_losses_csv_continues_from_the_checkpoint_step(tmp_path, capsys):
    def killed(step):
        if step == 3:
            raise RuntimeError("killed")  # after step 3's row, before its checkpoint

    with pytest.raises(RuntimeError, match="killed"):
        _run(tmp_path, 5, "--save-every", "2", on_step=killed)
    first = _steps(tmp_path)
    assert [r[0] for r in first] == ["1", "2", "3"] and _ckpt(tmp_path)["step"] == 2
    assert _leftovers(tmp_path) == []
    _run(tmp_path, 4, "--resume", str(tmp_path))
    again = _steps(tmp_path)
    assert [r[0] for r in again] == ["1", "2", "3", "4"]
    assert [r[:2] for r in again[:3]] == [r[:2] for r in first]  # step 3 done again, the same loss


# -- faults during a save, two trainers, a non-finite loss ------------------------------------------------

class Killed(BaseException):
    """Stands for a kill: nothing catches it."""


def test_kill_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    _run(tmp_path, 1)
    before = os.stat(tmp_path / "checkpoint.pt")
    real_save = torch.save

    def killed_save(obj, f, *a, **k):
        if isinstance(obj, dict) and "optimizer" in obj:
            real_save({"half": torch.zeros(1000)}, f)
            raise Killed
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", killed_save)
    with pytest.raises(Killed):
        _run(tmp_path, 2, "--resume", str(tmp_path))
    monkeypatch.undo()
    after = os.stat(tmp_path / "checkpoint.pt")
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert _ckpt(tmp_path)["step"] == 1 and not (tmp_path / "checkpoint.prev.pt").exists()
    assert _leftovers(tmp_path) == []
    # What kill -9 leaves: a partial .tmp and the lock of a process that is gone.
    (tmp_path / "checkpoint.pt.tmp").write_bytes(b"partial")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(f"{dead.pid} {files.socket.gethostname()}\n")
    capsys.readouterr()
    assert _run(tmp_path, 2, "--resume", str(tmp_path))["step"] == 2
    out = capsys.readouterr().out
    assert f"taking over the lock {tmp_path}/.lock: its process PID {dead.pid} is not running" in out
    assert "checkpoint.pt.tmp, left by an interrupted save" in out
    assert _leftovers(tmp_path) == [] and _ckpt(tmp_path, "checkpoint.prev.pt")["step"] == 1


def test_full_disk_during_a_save(tmp_path, monkeypatch, capsys):
    _run(tmp_path, 1)

    class DiskFull(files._File):
        def _write(self, b):
            if self.name.endswith("checkpoint.pt.tmp") and self.tell() + len(b) > 1 << 20:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super()._write(b)

    monkeypatch.setattr(files, "_File", DiskFull)
    rc, _, err = _cli(capsys, *TINY, "--resume", str(tmp_path), "--steps", "2")
    monkeypatch.undo()
    assert rc == 2
    assert f"no space left on device writing into {tmp_path}: checkpoint.pt was not written" in err
    assert f"training stopped at step 2; the last checkpoint, step 1, is kept in {tmp_path}/checkpoint.pt" in err
    assert _ckpt(tmp_path)["step"] == 1 and _leftovers(tmp_path) == []


def test_two_trainers_on_one_folder(tmp_path, capsys):
    first = subprocess.Popen([sys.executable, "-m", "fast_unet.train", *TINY, "--steps", "100000",
                              "--out", str(tmp_path)], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        lock = tmp_path / ".lock"
        deadline = time.monotonic() + 120
        while not (lock.exists() and lock.read_text().strip()) and time.monotonic() < deadline:
            assert first.poll() is None, "the first trainer exited"
            time.sleep(0.1)
        assert lock.read_text().split()[0] == str(first.pid)
        rc, _, err = _cli(capsys, *TINY, "--steps", "1", "--out", str(tmp_path))
        assert rc == 2 and f"is in use by another run, PID {first.pid}" in err
        assert lock.read_text().split()[0] == str(first.pid)
    finally:
        first.kill()  # kill -9: its lock stays behind
        first.wait()
    assert lock.exists()
    r = _run(tmp_path, 1)
    assert r["step"] == 1 and f"PID {first.pid} is not running" in capsys.readouterr().out
    assert _leftovers(tmp_path) == [] and [row[0] for row in _steps(tmp_path)] == ["1"]


def test_non_finite_loss_stops_in_one_line_keeping_the_checkpoint(tmp_path, capsys):
    rc, _, err = _cli(capsys, *TINY, "--steps", "6", "--lr", "1e30", "--out", str(tmp_path / "fresh"))
    assert rc == 2 and re.search(r"the loss is (nan|inf) at step \d: training stopped", err)
    assert "no checkpoint was written in this run" in err and not (tmp_path / "fresh" / "checkpoint.pt").exists()
    _run(tmp_path, 1)
    rc, _, err = _cli(capsys, *TINY, "--resume", str(tmp_path), "--steps", "6", "--lr", "1e30")
    assert rc == 2 and re.search(r"the loss is (nan|inf) at step \d: training stopped without saving", err)
    assert f"the last checkpoint, step 1, is kept in {tmp_path}/checkpoint.pt" in err
    assert _ckpt(tmp_path)["step"] == 1 and _leftovers(tmp_path) == []


# -- the loop: no host sync per step, the EMA in one call, the losses read every --log-every steps -----------

_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")


def _count_reads(monkeypatch):
    """Patches every Tensor method that moves a value to the host; counts its calls from the main thread (the
    prefetch thread's data order reads host tensors only) while ``on["counting"]``."""
    import threading
    on = {"counting": False, "n": 0}
    for name in _READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            if on["counting"] and threading.current_thread() is threading.main_thread():
                on["n"] += 1
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return on


@pytest.mark.parametrize("log_every,reads", [(4, 3), (1, 11)])
def test_the_loop_reads_the_device_only_every_log_every_steps(tmp_path, monkeypatch, log_every, reads):
    on = _count_reads(monkeypatch)
    seen = {}

    def hook(step):  # counts the reads of steps 2..12; the read at step 12 comes before its hook
        if step == 1:
            on["counting"] = True
        if step == 12:
            seen["n"], on["counting"] = on["n"], False
    _run(tmp_path, 12, "--log-every", str(log_every), "--save-every", "0", on_step=hook)
    monkeypatch.undo()
    assert seen["n"] == reads  # log-every 4: steps 4, 8, 12; log-every 1 (a read per step): 11
    assert [r[0] for r in _steps(tmp_path)] == [str(i) for i in range(1, 13)]


def test_a_per_step_item_is_counted(tmp_path, monkeypatch):
    """The counter above sees a loop that reads each step's loss (as ``loss.item()``)."""
    from fast_unet import loop
    on = _count_reads(monkeypatch)
    real = loop.TrainStep.__call__
    monkeypatch.setattr(loop.TrainStep, "__call__", lambda self, *a: torch.tensor(real(self, *a).item()))
    seen = {}

    def hook(step):
        on["counting"] |= step == 1
        if step == 6:
            seen["n"] = on["n"]
    _run(tmp_path, 6, "--log-every", "50", "--save-every", "0", on_step=hook)
    assert seen["n"] >= 5


def test_foreach_ema_is_the_per_tensor_update():
    from fast_unet.loop import ema_update, ema_weight
    torch.manual_seed(0)
    model, ema = UNet(device="cpu"), UNet(device="cpu")
    for w in (ema_weight(0, 0.999), ema_weight(3, 0.999), ema_weight(10 ** 6, 0.999), 0.5):
        per = [e.detach().clone() for e in ema.parameters()]
        for e, p in zip(per, model.parameters()):
            e.lerp_(p.detach(), w)
        for weight in (w, torch.tensor(w, dtype=torch.float32)):
            mine = [e.detach().clone() for e in ema.parameters()]
            ema_update(mine, [p.detach() for p in model.parameters()], weight)
            assert all(torch.equal(a, b) for a, b in zip(mine, per)), w
            assert any(not torch.equal(a, e) for a, e in zip(mine, ema.parameters()))
        with torch.no_grad():
            for e, v in zip(ema.parameters(), per):
                e.copy_(v)


def test_log_every_keeps_one_row_per_step_with_the_same_losses(straight, tmp_path):
    _run(tmp_path, 2, "--log-every", "3")
    assert [r[:3] for r in _steps(tmp_path)] == [r[:3] for r in _steps(straight)]
    _same_state(_ckpt(straight)["model"], _ckpt(tmp_path)["model"])
    _same_state(_ckpt(straight)["ema"], _ckpt(tmp_path)["ema"])


def test_a_non_finite_loss_inside_a_window_keeps_the_checkpoint_before_it(tmp_path, monkeypatch, capsys):
    from fast_unet import loop
    real, calls = loop.TrainStep.__call__, {"n": 0}

    def nan_at_step_7(self, *a):
        calls["n"] += 1
        loss = real(self, *a)
        return loss * float("nan") if calls["n"] == 7 else loss
    monkeypatch.setattr(loop.TrainStep, "__call__", nan_at_step_7)
    # reads at steps 4 (a save), 5, 8 (a save, after the read): the NaN of step 7 is found at step 8
    rc, _, err = _cli(capsys, *TINY, "--steps", "10", "--save-every", "4", "--log-every", "5", "--out", str(tmp_path))
    assert rc == 2 and "the loss is nan at step 7: training stopped without saving" in err
    assert f"the last checkpoint, step 4, is kept in {tmp_path}/checkpoint.pt" in err
    assert _ckpt(tmp_path)["step"] == 4 and not (tmp_path / "checkpoint.prev.pt").exists()
    assert [r[0] for r in _steps(tmp_path)] == ["1", "2", "3", "4", "5", "6"] and _leftovers(tmp_path) == []


def test_log_every_must_be_positive(tmp_path):
    with pytest.raises(train.TrainError, match="--log-every must be >= 1, got 0"):
        _run(tmp_path, 1, "--log-every", "0")


# -- resume continues the run: every flag, an image folder, explicit changes, help ------------------------------

def _image_folder(d, n=8):
    from PIL import Image
    d.mkdir()
    g = torch.Generator().manual_seed(7)
    for i in range(n):
        px = torch.randint(0, 256, (20 + i, 24, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(px.numpy()).save(d / f"{i}.png")
    return d


# Every run flag at a value other than its default (steps apart: each command gives it).
NON_DEFAULT = {"image_size": 16, "batch_size": 4, "lr": 1e-3, "optimizer": "adamw", "weight_decay": 0.05,
               "ema_decay": 0.9, "noise_steps": 50, "sample_every": 6, "sample_n": 2, "sample_steps": 2,
               "save_every": 3, "embedded_size": 16, "seed": 5}


def test_resume_continues_on_the_folder_with_every_flag(tmp_path, capsys):
    """The issue's case: a run on an image folder at 16x16, batch 4, resumed with --resume OUT --steps N only,
    continues on that folder with every flag of the first command: the same losses as the uninterrupted run."""
    data = _image_folder(tmp_path / "images")
    assert set(NON_DEFAULT) | {"data", "steps"} == set(train.RUN_DEFAULTS)
    assert all(v != train.RUN_DEFAULTS[k] or k == "optimizer" for k, v in NON_DEFAULT.items())
    flags = ["--data", str(data), "--no-progress", "--threads", "1"]
    for k, v in NON_DEFAULT.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    train.main(flags + ["--steps", "6", "--out", str(tmp_path / "A")])
    train.main(flags + ["--steps", "3", "--out", str(tmp_path / "A2")])
    capsys.readouterr()
    train.main(["--resume", str(tmp_path / "A2"), "--steps", "6", "--no-progress", "--threads", "1"])
    out = capsys.readouterr().out
    assert "warning" not in out and "->" not in out.replace("steps 3->6", ""), out
    assert "global batch 4 (1 x 4), lr 0.001, 8 images of 16x16, steps 3->6" in out
    a, b = _ckpt(tmp_path / "A"), _ckpt(tmp_path / "A2")
    for k in train.RUN_DEFAULTS:
        assert b["args"][k] == a["args"][k], k
    assert b["args"]["data"] == str(data) and b["args"]["data_fingerprint"]["files"] == 8
    assert [r[:3] for r in _steps(tmp_path / "A2")] == [r[:3] for r in _steps(tmp_path / "A")]
    _same_state(a["model"], b["model"])
    _same_state(a["ema"], b["ema"])
    assert os.listdir(tmp_path / "A2" / "samples") == ["step_000006.png"]


def test_resume_logs_each_change_given_again(tmp_path, capsys):
    _run(tmp_path, 1)
    capsys.readouterr()
    _run(tmp_path, 2, "--resume", str(tmp_path), "--lr", "0.0001", "--sample-n", "3", "--batch-size", "4",
         "--weight-decay", "0.02")
    out = capsys.readouterr().out
    assert "lr 0.0003 -> 0.0001 from step 1" in out and "weight_decay 0.01 -> 0.02 from step 1" in out
    assert "\nsample_n 4 -> 3 from step 1\n" in out
    assert "warning: batch_size 2 -> 4 from step 1: the run will not be the exact continuation" in out
    c = _ckpt(tmp_path)["args"]
    assert (c["lr"], c["sample_n"], c["batch_size"], c["weight_decay"]) == (1e-4, 3, 4, 0.02)


def test_resume_says_when_the_data_folder_is_gone_or_changed(tmp_path, capsys, monkeypatch):
    data = _image_folder(tmp_path / "images")
    monkeypatch.chdir(tmp_path)  # the run is given the folder as a relative path
    base = ["--image-size", "16", "--batch-size", "4", "--no-progress", "--threads", "1"]
    train.main(base + ["--data", "images", "--steps", "1", "--out", "run"])
    capsys.readouterr()
    # Resumed from another working directory: the relative path is found through the checkpoint's record.
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    train.main(["--resume", str(tmp_path / "run"), "--steps", "2", "--no-progress", "--threads", "1"])
    assert f"8 images of 16x16" in capsys.readouterr().out
    # A file more: said, and training goes on with the folder as it is.
    from PIL import Image
    Image.new("RGB", (16, 16), (9, 9, 9)).save(data / "new.png")
    train.main(["--resume", str(tmp_path / "run"), "--steps", "3", "--no-progress", "--threads", "1"])
    out = capsys.readouterr().out
    assert f"warning: --data {data} holds 9 file(s), {data} held 8 when the checkpoint was written" in out
    assert "9 images of 16x16" in out
    # The same count as the checkpoint's (step 3: 9 files), one file rewritten with another size.
    Image.new("RGB", (30, 16), (9, 9, 9)).save(data / "0.png")
    train.main(["--resume", str(tmp_path / "run"), "--steps", "4", "--no-progress", "--threads", "1"])
    assert "files' names or sizes differ from those of" in capsys.readouterr().out
    # Gone: one line, not the embedded data set.
    data.rename(tmp_path / "moved")
    rc, _, err = _cli(capsys, "--resume", str(tmp_path / "run"), "--steps", "5", "--no-progress")
    assert rc == 2 and "the checkpoint's data folder" in err and "is not there (moved or deleted)" in err
    assert _ckpt(tmp_path / "run")["step"] == 4
    rc, out, err = _cli(capsys, "--resume", str(tmp_path / "run"), "--steps", "5", "--no-progress", "--threads",
                        "1", "--data", str(tmp_path / "moved"))
    assert rc == 0, err
    assert f"warning: data {data} -> {tmp_path / 'moved'} from step 4" in out and "differ" not in out


def test_short_run_says_samples_are_still_noise(tmp_path, capsys):
    _run(tmp_path, 1)
    out = capsys.readouterr().out
    assert f"note: after 1 steps the samples are still mostly noise" in out
    assert f"around {train.SAMPLES_TAKE_SHAPE} steps: continue with --resume {tmp_path}" in out


@pytest.mark.parametrize("module", ["train", "sample"])
def test_help_describes_every_flag_and_its_default(module):
    import importlib
    parser = importlib.import_module(f"fast_unet.{module}").build_parser()
    formatter = parser._get_formatter()
    options = [a for a in parser._actions if a.dest != "help"]
    assert len(options) >= 15
    for a in options:
        assert a.help and a.help.strip(), a.option_strings
        text = formatter._get_help_string(a) % {"default": a.default}
        assert a.required or "default" in text, (a.option_strings, text)
        if module == "train" and a.dest in train.RUN_DEFAULTS:
            assert "on --resume: the checkpoint's" in text, a.option_strings
    assert "--no-progress" in parser.format_help()
    assert "(default: 0.0003; on --resume: the checkpoint's)" in " ".join(train.build_parser().format_help().split())
