"""The record of one launch and the bytes it moves: ``Launch`` (a Triton kernel or an aten op), the
tensors it reads and writes (``Touched``, compulsory traffic), and the per-kernel tables built from them
(``group``, ``summarise``). Measures nothing by itself: ``bench/recorder.py`` fills a ``Trace`` of
launches, ``python -m bench.kernels`` prints the tables, ``python -m bench.estimate`` turns them into
times at a GPU's ceilings.

Bytes: the compulsory traffic of each launch: every distinct tensor it reads, once, at its view's size
(numel * element size; views of one storage together capped at the storage's size), and every tensor it
writes, once. Re-reads (from L2 or DRAM) are not counted: the conv's input re-read per output-channel
tile, attention's K/V re-read per query tile, a weight read by every program.
"""
from collections import OrderedDict
from dataclasses import dataclass, field


CAVEAT = ("eager counts are aten ops that launch a kernel: a lower bound on CUDA launches (a cuDNN conv "
          "+ its bias add, native_group_norm's two kernels, split-K GEMM reductions are one op each), so "
          "ratios against the eager models are conservative")
BYTES_NOTE = ("bytes: compulsory traffic, each distinct tensor a launch touches once at its view's size "
              "(views of one storage capped at its size); re-reads from L2/DRAM (conv input per "
              "output-channel tile, attention K/V per query tile) are not counted; MB = 1e6 bytes")


# ---------------------------------------------------------------------------------------------------
# What one launch touched

@dataclass
class Touched:
    """One tensor a launch reads or writes (several argument names when one tensor was passed twice)."""
    names: list
    shape: list
    dtype: str
    bytes: int


@dataclass
class Launch:
    kind: str  # "triton" or "torch"
    name: str  # the kernel's function name, or the aten op ("aten.addmm.default")
    inside: str = None  # the fast_unet custom op whose implementation issued it, if any
    grid: list = None
    reads: list = field(default_factory=list)
    writes: list = field(default_factory=list)
    declared: bool = True  # Triton: the kernel's module declares its writes (WRITES / UPDATES)
    flops: int = 0  # bench/work.py: FLOPs, the unit that runs them, exponentials
    unit: str = None
    exps: int = 0
    known: bool = True  # a formula (or an elementwise kernel) accounts for its FLOPs
    # Triton: the launch's other arguments (constexprs, scalars, num_warps, num_stages), by name
    args: dict = None
    # bench/work.py: the inner loop's work (Triton: its iterations; attention and SDPA: scores and head
    # dim), and the bytes re-read from L2 inside it (tiles loaded once per program, dQ's atomic adds)
    loop: dict = None
    l2_bytes: int = 0

    @property
    def read_bytes(self):
        return sum(t.bytes for t in self.reads)

    @property
    def write_bytes(self):
        return sum(t.bytes for t in self.writes)


def _storage_key(t):
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # a tensor without storage (a subclass): its own identity
        return ("tensor", id(t))


def _storage_nbytes(t):
    try:
        return t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return t.numel() * t.element_size()


def touched(named):
    """[(name, tensor)] -> [Touched]: identical views merged (their names joined), each storage's views
    together capped at the storage's size (an expanded or overlapping view costs at most the storage)."""
    views = OrderedDict()
    for name, t in named:
        key = (_storage_key(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in views:
            views[key][0].append(name)
        else:
            views[key] = ([name], t)
    left = {}  # storage -> bytes it can still account for
    out = []
    for (skey, *_), (names, t) in views.items():
        cap = left.setdefault(skey, _storage_nbytes(t))
        n = min(t.numel() * t.element_size(), cap)
        left[skey] = cap - n
        out.append(Touched(names, list(t.shape), str(t.dtype).replace("torch.", ""), n))
    return out


class Trace:
    """The launches of one run, in order, from both recorders; ``inside``: the custom-op stack."""

    def __init__(self):
        self.launches = []
        self.inside = []
        self.notes = set()

    def where(self):
        return self.inside[-1] if self.inside else None


# ---------------------------------------------------------------------------------------------------
# Summaries

def group(launches):
    """Rows per (kind, name): calls, bytes read and written (totals and per call)."""
    rows = OrderedDict()
    for ln in launches:
        r = rows.setdefault((ln.kind, ln.name), dict(kind=ln.kind, name=ln.name, calls=0, read=0, written=0,
                                                      declared=ln.declared))
        r["calls"] += 1
        r["read"] += ln.read_bytes
        r["written"] += ln.write_bytes
    out = sorted(rows.values(), key=lambda r: (r["kind"] != "triton", -(r["read"] + r["written"])))
    for r in out:
        r["read_per_call"] = r["read"] / r["calls"]
        r["written_per_call"] = r["written"] / r["calls"]
    return out


def summarise(trace):
    ls = trace.launches
    tri = [x for x in ls if x.kind == "triton"]
    return {
        "launches": len(ls), "triton": len(tri), "torch": len(ls) - len(tri),
        "read_bytes": sum(x.read_bytes for x in ls), "written_bytes": sum(x.write_bytes for x in ls),
        "undeclared_kernels": sorted({x.name for x in tri if not x.declared}),
        "notes": sorted(trace.notes),
    }
