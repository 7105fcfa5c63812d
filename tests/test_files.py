"""fast_unet.files: the safe loader, atomic writes (interrupted, full disk) and the run lock."""
import errno
import os
import subprocess
import sys

import pytest
import torch

from fast_unet import files
from fast_unet.files import FileError, RunLock, UnsafeFileError, atomic_torch_save, atomic_write, safe_load


class Payload:
    """Pickles as a call to os.system: loading it with weights_only=False would create ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_safe_load_refuses_a_payload_without_running_it(tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"model": {"w": torch.zeros(2)}, "x": Payload(marker)}, tmp_path / "p.pt")
    with pytest.raises(UnsafeFileError, match=r"refused by the safe loader.*nothing in it was run.*system") as e:
        safe_load(tmp_path / "p.pt", "--weights")
    assert "\n" not in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4])
def test_safe_load_refuses_a_raw_pickle_payload(tmp_path, protocol):
    import pickle
    marker = tmp_path / "MARKER"
    (tmp_path / "p.pt").write_bytes(pickle.dumps({"ema": Payload(marker)}, protocol=protocol))
    with pytest.raises(FileError, match="nothing in it was run") as e:
        safe_load(tmp_path / "p.pt", "--weights")
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_safe_load_reads_tensors_and_plain_values(tmp_path):
    obj = {"w": torch.arange(3), "n": 1, "f": 0.5, "s": "x", "l": [1, None], "t": (1, 2), "d": {"a": True}}
    torch.save(obj, tmp_path / "ok.pt")
    back = safe_load(tmp_path / "ok.pt")
    assert torch.equal(back.pop("w"), obj.pop("w")) and back == obj


@pytest.mark.parametrize("kind,message", [
    ("missing", "no such file"),
    ("empty", "damaged: the file is empty"),
    ("truncated", "damaged or not a torch file"),
    ("junk", "damaged or not a torch file"),
    ("folder", "is a folder"),
    ("fifo", "not a regular file"),  # opening it would block
])
def test_safe_load_damaged_files_one_line(tmp_path, kind, message):
    p = tmp_path / "w.pt"
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "truncated":
        torch.save({"w": torch.zeros(1000)}, p)
        p.write_bytes(p.read_bytes()[:1500])
    elif kind == "junk":
        p.write_bytes(b"not a checkpoint at all")
    elif kind == "folder":
        p.mkdir()
    elif kind == "fifo":
        os.mkfifo(p)
    with pytest.raises(FileError, match=message) as e:
        safe_load(p, "--resume")
    assert "\n" not in str(e.value) and str(p) in str(e.value)


def test_safetensors_round_trip_and_damage(tmp_path):
    sd = {"a": torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last), "b": torch.zeros(3)}
    files.save_safetensors(sd, tmp_path / "w.safetensors")
    back = files.load_state_dict_file(str(tmp_path / "w.safetensors"))
    assert torch.equal(back["a"], sd["a"]) and torch.equal(back["b"], sd["b"])
    (tmp_path / "bad.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:40])
    with pytest.raises(FileError, match="damaged or not a safetensors file"):
        files.load_state_dict_file(str(tmp_path / "bad.safetensors"))


def _tmp_files(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_interrupted_write_keeps_the_old_file_and_removes_tmp(tmp_path):
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save({"step": 1}, path)

    def killed(f):
        f.write(b"partial" * 1000)
        raise KeyboardInterrupt  # a kill in the middle of the write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, killed, keep=tmp_path / "checkpoint.prev.pt")
    assert safe_load(path) == {"step": 1}
    assert _tmp_files(tmp_path) == [] and not (tmp_path / "checkpoint.prev.pt").exists()


@pytest.mark.parametrize("unique", [False, True], ids=["fixed-tmp", "unique-tmp"])
def test_two_writers_at_once(tmp_path, unique):
    """A second writer that starts while the first is still writing (another process tuning the same cache):
    with one fixed ``PATH.tmp`` it truncates the first writer's file, the first writer's rename fails and its
    last bytes land in the file the second installed (a corrupt cache); with ``unique`` each writer installs its
    whole file and the last one wins."""
    path = tmp_path / "tune.json"

    def first(f):
        f.write(b'{"writer": "first", ')
        f.flush()
        atomic_write(path, lambda g: g.write(b'{"writer": "second"}'), sync=False, unique=unique)
        f.write(b'"done": true}')

    if unique:
        atomic_write(path, first, sync=False, unique=True)
        assert path.read_bytes() == b'{"writer": "first", "done": true}'
    else:
        with pytest.raises(FileError):  # the second writer renamed the shared .tmp away
            atomic_write(path, first, sync=False)
        # and the first one's last bytes went into the file the second installed: neither whole file
        assert path.read_bytes() not in (b'{"writer": "second"}', b'{"writer": "first", "done": true}')
    assert _tmp_files(tmp_path) == []


def test_keep_renames_the_previous_file(tmp_path):
    path, prev = tmp_path / "c.pt", tmp_path / "c.prev.pt"
    atomic_torch_save({"step": 1}, path, keep=prev)
    assert not prev.exists()
    atomic_torch_save({"step": 2}, path, keep=prev)
    assert safe_load(path) == {"step": 2} and safe_load(prev) == {"step": 1}


class _DiskFull(files._File):
    """The disk fills after ``room`` bytes of this file."""
    room = 100

    def _write(self, b):
        if self.tell() + len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super()._write(b)


@pytest.mark.parametrize("writer", ["torch.save", "wrapping"])
def test_full_disk_says_so_and_removes_tmp(tmp_path, monkeypatch, writer):
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save({"step": 1}, path)
    monkeypatch.setattr(files, "_File", _DiskFull)

    def wrapping(f):  # a writer that reports the failure its own way (torch.save to a path does this)
        try:
            f.write(b"x" * 200)
            f.flush()
        except OSError:
            raise RuntimeError("unexpected pos 1604224 vs 1604112") from None

    write = (lambda f: torch.save({"w": torch.zeros(1000)}, f)) if writer == "torch.save" else wrapping
    with pytest.raises(FileError, match=f"no space left on device writing into {tmp_path}: checkpoint.pt") as e:
        atomic_write(path, write)
    assert "\n" not in str(e.value)
    assert _tmp_files(tmp_path) == []
    monkeypatch.undo()
    assert safe_load(path) == {"step": 1}


def test_other_write_errors_are_one_line(tmp_path):
    with pytest.raises(FileError, match="cannot write .*No such file or directory"):
        atomic_write(tmp_path / "missing" / "x.pt", lambda f: f.write(b"x"))


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (tmp_path / ".lock").write_text(f"{sleeper.pid} {files.socket.gethostname()}\n")
        with pytest.raises(FileError, match=f"in use by another run, PID {sleeper.pid}"):
            RunLock(str(tmp_path), "--out").acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    logged = []
    lock = RunLock(str(tmp_path), "--out").acquire(log=logged.append)
    assert logged and f"PID {sleeper.pid} is not running" in logged[0]
    assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
    with pytest.raises(FileError, match=f"PID {os.getpid()}"):  # a second holder in this process too
        RunLock(str(tmp_path), "--out").acquire()
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_lock_with_unreadable_content_or_dead_pid_is_stale(tmp_path):
    for content in ("", "garbage", f"{_dead_pid()}"):
        (tmp_path / ".lock").write_text(content)
        with RunLock(str(tmp_path)) as lock:
            assert lock.held
        assert not (tmp_path / ".lock").exists()
