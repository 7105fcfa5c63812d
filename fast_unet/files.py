"""Reading and writing the training and sampling files safely.

- ``safe_load``: ``torch.load(..., weights_only=True)``, which builds only tensors, numbers, strings, lists,
  tuples and dicts and never runs code from the file; a file it refuses, or a damaged one, raises
  ``FileError`` with one line that names the file and says why.
- ``load_state_dict_file``: a ``.safetensors`` file or a ``.pt`` read by ``safe_load``.
- ``atomic_write``: write ``NAME.tmp`` in the same folder, flush and fsync it, then rename it over ``NAME``
  (optionally keeping the file it replaces as a second name). A failed or interrupted write removes the
  ``.tmp`` and leaves ``NAME`` as it was; a full disk is reported as "no space left on device".
- ``RunLock``: a ``.lock`` file in an output folder holding the owner's PID; a second owner is refused while
  that process lives, a lock whose process is gone is taken over.
"""
import errno
import io
import os
import pickle
import socket
import stat
import warnings

import torch

__all__ = ["FileError", "safe_load", "load_state_dict_file", "atomic_write", "atomic_torch_save",
           "save_safetensors", "RunLock"]


class FileError(RuntimeError):
    """A file that cannot be read or written, said in one line."""


def _first_line(e, limit=160):
    """The first sentence of an exception's message, at most ``limit`` characters."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    line = text.splitlines()[0]
    cut = line.find(". ")
    line = line[:cut + 1] if cut > 0 else line
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _refusal(e):
    """What a weights-only ``UnpicklingError`` stopped at (``GLOBAL posix.system ...``, ``Unsupported operand
    110``), in one sentence."""
    text = str(e).replace("WeightsUnpickler error:", "\n")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for key in ("GLOBAL", "Unsupported", "unsupported"):
        for line in lines:
            if key in line:
                return _first_line(line[line.find("Unsupported global:"):] if "Unsupported global:" in line
                                   else line)
    return _first_line(e)


def _check_regular(path, what):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileError(f"{what} {path!r}: no such file") from None
    except OSError as e:
        raise FileError(f"{what} {path!r}: cannot read it: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise FileError(f"{what} {path!r} is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise FileError(f"{what} {path!r} is not a regular file")
    if st.st_size == 0:
        raise FileError(f"{what} {path!r} is damaged: the file is empty")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise FileError(f"{what} {path!r}: cannot read it: {e.strerror or e}") from None


class UnsafeFileError(FileError):
    """The safe loader refused the file: it asks to build Python objects, which could run code."""


def safe_load(path, what="file"):
    """``torch.load(path, map_location="cpu", weights_only=True)``. Raises ``UnsafeFileError`` for a file that
    holds anything beyond tensors and plain containers (nothing from it runs), ``FileError`` for a missing,
    empty, truncated or otherwise damaged file."""
    path = os.fspath(path)
    _check_regular(path, what)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = _refusal(e)
        if "GLOBAL" not in why:  # not a request for a Python object: an unknown opcode, i.e. not a torch file
            raise FileError(f"{what} {path!r} is damaged or not a torch file (the safe loader stopped at: "
                            f"{why}; nothing in it was run)") from None
        raise UnsafeFileError(
            f"{what} {path!r} was refused by the safe loader (weights_only=True), nothing in it was run: "
            f"{why} Only tensors, numbers, strings, lists and dicts are loaded") from None
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - truncated zip, bad header, ...: the file is damaged
        raise FileError(f"{what} {path!r} is damaged or not a torch file "
                        f"({type(e).__name__}: {_first_line(e)})") from None


def load_state_dict_file(path, what="file"):
    """The tensors of a ``.safetensors`` file (safetensors.torch.load_file), else what ``safe_load`` reads."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        return safe_load(path, what)
    _check_regular(path, what)
    from safetensors.torch import load_file
    try:
        return load_file(path, device="cpu")
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - bad header or truncated data
        raise FileError(f"{what} {path!r} is damaged or not a safetensors file "
                        f"({type(e).__name__}: {_first_line(e)})") from None


# -- writing ------------------------------------------------------------------------------------------------

class _File(io.FileIO):
    """A file whose write errors are remembered: a writer that wraps the OSError (or swallows it) still lets
    ``atomic_write`` see a full disk."""
    error = None
    _write = io.FileIO.write

    def write(self, b):
        try:
            return self._write(b)
        except OSError as e:
            self.error = e
            raise


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write, keep=None, sync=True, unique=False):
    """Call ``write(f)`` on a binary file ``PATH.tmp``, flush and fsync it (``sync=False``: no fsync, for many
    small files), then rename it to ``path``. ``unique``: the temporary file is ``PATH.<pid>.<random>.tmp``, for
    a file that several processes may write at once (each rename then installs one whole file; with one
    ``PATH.tmp`` a second writer would truncate the first one's temporary file before its rename). With ``keep``, an existing ``path`` is renamed to ``keep`` first
    (the one before stays readable). On any
    exception (a write error, KeyboardInterrupt) the ``.tmp`` is removed and ``path`` is untouched; an
    ``OSError`` becomes a one-line ``FileError``, ENOSPC as "no space left on device writing into FOLDER"."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp" if unique else path + ".tmp"
    f = None
    try:
        f = _File(tmp, "w")
        with io.BufferedWriter(f, buffer_size=1 << 20) as buffered:
            write(buffered)
            buffered.flush()
            if sync:
                os.fsync(f.fileno())
        if keep is not None and os.path.exists(path):
            os.replace(path, keep)
        os.replace(tmp, path)
        if sync:
            _fsync_dir(folder)
    except BaseException as e:
        err = f.error if f is not None and f.error is not None else e
        if f is not None and not f.closed:
            try:
                f.close()
            except OSError:
                pass
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(err, OSError):
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise FileError(f"no space left on device writing into {folder}: {os.path.basename(path)} "
                                "was not written (the previous file, if any, is kept)") from None
            raise FileError(f"cannot write {path}: {err.strerror or err}") from None
        raise
    return path


def atomic_torch_save(obj, path, keep=None):
    """``torch.save(obj)`` through ``atomic_write``."""
    return atomic_write(path, lambda f: torch.save(obj, f), keep=keep)


def save_safetensors(state_dict, path):
    """A state_dict as ``.safetensors`` (contiguous copies: conv weights are channels_last), through
    ``atomic_write``."""
    from safetensors.torch import save
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    return atomic_write(path, lambda f: f.write(save(tensors, metadata={"format": "pt"})))


# -- the run lock -------------------------------------------------------------------------------------------

def _pid_alive(pid):
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    try:  # a zombie (exited, not yet reaped) holds nothing
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class RunLock:
    """``FOLDER/.lock``, created with O_CREAT | O_EXCL, holding ``PID HOST``. ``acquire()`` raises
    ``FileError`` naming the holder while it runs; a lock whose process is gone (same host) is taken over,
    with ``log`` told. ``release()`` removes the file if it is still this process's."""

    NAME = ".lock"

    def __init__(self, folder, what="folder"):
        self.folder = folder
        self.path = os.path.join(folder, self.NAME)
        self.what = what
        self.held = False

    def _read(self):
        try:
            with open(self.path) as f:
                parts = f.read().split()
        except FileNotFoundError:
            return None
        except OSError:
            return (-1, "")
        try:
            return int(parts[0]), (parts[1] if len(parts) > 1 else "")
        except (IndexError, ValueError):
            return (-1, "")

    def acquire(self, log=print):
        me = f"{os.getpid()} {socket.gethostname()}\n"
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:  # removed meanwhile
                    continue
                pid, host = holder
                if host and host != socket.gethostname():
                    raise FileError(f"{self.what} {self.folder!r} is in use by PID {pid} on {host} (lock file "
                                    f"{self.path}); if that run is gone, delete the lock file")
                if _pid_alive(pid):
                    raise FileError(f"{self.what} {self.folder!r} is in use by another run, PID {pid} (lock "
                                    f"file {self.path}); wait for it to finish or use another folder")
                log(f"taking over the lock {self.path}: its process "
                    f"{'PID ' + str(pid) if pid > 0 else '(unreadable)'} is not running")
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            except OSError as e:
                raise FileError(f"cannot create the lock file {self.path}: {e.strerror or e}") from None
            try:
                os.write(fd, me.encode())
            finally:
                os.close(fd)
            self.held = True
            return self
        raise FileError(f"could not take the lock {self.path}: another run keeps creating it")

    def release(self):
        if not self.held:
            return
        self.held = False
        holder = self._read()
        if holder is not None and holder[0] == os.getpid():
            try:
                os.remove(self.path)
            except OSError:
                pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
