"""What one iteration of a kernel's inner loop issues, read from its SASS (``cuobjdump -sass`` of a cubin).

No GPU and no Triton needed to parse: ``parse`` takes the disassembler's text; ``disassemble`` runs the
``cuobjdump`` that ships in Triton's wheel (``triton/backends/nvidia/bin``) on a cubin's bytes.

The loop rule (``hot_loop``):

- a loop is a backward branch: a ``BRA`` (or ``JMP``) at address A whose target T is below A; its body is
  every instruction from T to A, both included. A branch to itself (``BRA`` to its own address, the
  padding after ``EXIT``) is not a loop;
- loops that overlap without nesting do not occur in compiled structured code; nesting is by address
  range: a loop whose range holds another's is its outer loop (its depth is one less);
- a retry loop of compare-and-swap (a body with an atomic ``CAS``, no tensor-core instruction and no loop
  inside: the spin of an atomic the hardware has no instruction for) is not a work loop: it is left out unless the
  kernel has no other loop;
- the hot loop is an innermost tensor-core loop: among the loops with tensor-core instructions, those
  that hold no other such loop (the K loop, not the loop over taps around it; an attention loop with a
  retry loop inside it); of those, the one with the most tensor-core instructions, then the longest.
  Where no loop has tensor-core work, the longest of the innermost loops (those holding no other).

The count of a loop is static: every instruction of the body once, whether predicated off or skipped by
a forward branch inside it (Triton's loops predicate rather than branch, so the two agree there).
Instructions are per warp: a program of ``num_warps`` warps issues ``num_warps`` times as many warp
instructions per iteration (``per_units``).
"""
import functools
import hashlib
import json
import os
import re
import subprocess
import tempfile
from collections import Counter

# Opcode families that run on the tensor cores (the part before the first '.'): Volta-Ampere's warp
# MMAs, Hopper's warpgroup MMAs (wgmma: HGMMA for fp16/bf16/tf32, IGMMA int8, QGMMA fp8), fp64 and 1-bit.
TENSOR_CORE_OPS = ("HMMA", "IMMA", "DMMA", "BMMA", "HGMMA", "IGMMA", "QGMMA", "BGMMA")
BRANCH_OPS = ("BRA", "JMP")

# cuobjdump: "/*0710*/   @!P0 BRA 0x1cf0 ;   /* 0x...encoding */"; nvdisasm: the same without the encoding,
# branch targets as labels ("BRA `(.L_x_1)") defined on lines of their own (".L_x_1:").
_LINE = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;?\s*(?:/\*\s*0x[0-9a-fA-F]+\s*\*/)?\s*$")
_LABEL = re.compile(r"^\s*([.$\w]+):\s*$")
_FUNCTION = re.compile(r"^\s*(?:Function\s*:\s*|\.text\.)(\S+?):?\s*$")
_PRED = re.compile(r"^@!?U?P(?:T|\d+)\s+")


def parse(text):
    """{function name: [(address, opcode, instruction text)]} of a ``cuobjdump -sass`` listing, in address
    order. The opcode keeps its modifiers (``MUFU.EX2``, ``HGMMA.64x64x16.F32.BF16``); a predicate
    (``@!P0``) is dropped from it and kept in the text. Instructions outside any function (a
    listing without ``Function :`` headers) go under ""."""
    out = {}
    current = out.setdefault("", [])
    labels, pending = {}, []
    for line in text.splitlines():
        m = _FUNCTION.match(line)
        if m:
            current = out.setdefault(m.group(1), [])
            continue
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _LINE.match(line)
        if not m:
            continue
        body = m.group(2).strip().rstrip(";").strip()
        op = _PRED.sub("", body).split(None, 1)
        if not op:
            continue
        addr = int(m.group(1), 16)
        for name in pending:  # a label names the address of the instruction that follows it
            labels[name] = addr
        pending = []
        current.append((addr, op[0], body))
    if labels:  # nvdisasm's labels become addresses, as cuobjdump prints them
        sub = re.compile(r"`\(([.$\w]+)\)")
        for name, instrs in out.items():
            out[name] = [(a, op, sub.sub(lambda m: hex(labels.get(m.group(1), -1)) if m.group(1) in labels
                                         else m.group(0), t)) for a, op, t in instrs]
    if not out[""] or len(out) > 1:  # before the first function: nothing, or nvdisasm's data sections
        del out[""]
    return out


def branch_target(text):
    """The target address of a branch instruction's text (its last hex operand), or None."""
    hexes = re.findall(r"0x([0-9a-fA-F]+)", _PRED.sub("", text).split(None, 1)[-1])
    return int(hexes[-1], 16) if hexes else None


def family(opcode):
    return opcode.split(".", 1)[0]


def loops(instrs):
    """[{start, end, body (its instructions), depth}] of one function's instructions: one per backward branch
    (see the module docstring), outermost first."""
    addrs = [a for a, _, _ in instrs]
    found = []
    for i, (addr, op, text) in enumerate(instrs):
        if family(op) not in BRANCH_OPS:
            continue
        target = branch_target(text)
        if target is None or target >= addr:
            continue
        j = next((k for k, a in enumerate(addrs) if a >= target), i)
        found.append({"start": addrs[j], "end": addr, "body": instrs[j:i + 1]})
    for lp in found:
        lp["depth"] = sum(1 for o in found if o is not lp and o["start"] <= lp["start"] and lp["end"] <= o["end"]
                          and (o["start"], o["end"]) != (lp["start"], lp["end"]))
    return sorted(found, key=lambda lp: (lp["start"], -lp["end"]))


def loop_counts(body):
    """{insts, ex2, tensor_core, ops} of a loop body: instructions, ``MUFU.EX2`` (any precision), the
    tensor-core instructions, and the count of each opcode family (``FSEL``, ``ISETP``, ``LDGSTS``...)."""
    ops = Counter(family(op) for _, op, _ in body)
    return {"insts": len(body),
            "ex2": sum(1 for _, op, _ in body if op.startswith("MUFU.EX2")),
            "tensor_core": sum(ops[f] for f in TENSOR_CORE_OPS),
            "ops": dict(ops.most_common())}


def _holds(outer, inner):
    return outer is not inner and outer["start"] <= inner["start"] and inner["end"] <= outer["end"]


def is_retry(lp, found):
    """A compare-and-swap retry loop: an atomic ``CAS`` in the body, no tensor-core instruction and no loop
    inside (of ``found``)."""
    return (lp["tensor_core"] == 0 and not any(_holds(lp, o) for o in found)
            and any(".CAS" in op and family(op) in ("ATOM", "ATOMG", "ATOMS") for _, op, _ in lp["body"]))


def hot_loop(instrs):
    """The hot loop of one function (the rule in the module docstring) with its ``loop_counts`` merged in
    and ``loops``, the number of loops found; None when the function has no loop."""
    found = loops(instrs)
    if not found:
        return None
    for lp in found:
        lp.update(loop_counts(lp["body"]))
    work = [lp for lp in found if not is_retry(lp, found)] or found
    tc = [lp for lp in work if lp["tensor_core"]]
    pool = tc or work
    innermost = [lp for lp in pool if not any(_holds(lp, o) for o in pool)]
    best = max(innermost, key=lambda lp: (lp["tensor_core"], lp["insts"]))
    out = {k: v for k, v in best.items() if k != "body"}
    out["loops"] = len(found)
    return out


def per_units(counts, num_warps, units, per=1024):
    """Warp instructions per ``per`` units of work (scores, tile elements) of one iteration that covers
    ``units`` of them, run by ``num_warps`` warps: ``insts x num_warps x per / units``; and the same for
    the ``MUFU.EX2`` and the tensor-core instructions."""
    f = num_warps * per / units
    return {"insts": counts["insts"] * f, "ex2": counts["ex2"] * f, "tensor_core": counts["tensor_core"] * f}


def ptx_has_loop(ptx):
    """True when a PTX listing branches back to a label above the branch (a loop), so that kernels
    without one need not be disassembled."""
    lines = ptx.splitlines()
    labels = {}
    for i, line in enumerate(lines):
        m = re.match(r"^\s*(\$?[\w$]+):", line)
        if m:
            labels[m.group(1)] = i
    for i, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$?[\w$]+)\s*;", line)
        if m and labels.get(m.group(1), i + 1) <= i:
            return True
    return False


def _cuobjdump():
    try:
        import triton
    except ImportError:
        return "cuobjdump"
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else "cuobjdump"


def disassemble(cubin):
    """``cuobjdump -sass`` of a cubin's bytes (the one in Triton's wheel, else the one on PATH)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout


def kernel_loop(cubin, cache=True):
    """``hot_loop`` of the one kernel in a cubin (the function with the most instructions if there are
    several), or None.

    With ``cache``, the result is kept as JSON in ``sass/`` of fast_unet's cache folder
    (``fast_unet.tuning.cache_dir``), named by the SHA-256 of the cubin and of this module's source, so a
    cubin already analysed by this parser is not disassembled again. An unreadable entry is analysed anew
    and replaced; entries are written with ``fast_unet.files.atomic_write``, so a killed run leaves none
    half written."""
    path = _cache_file(cubin) if cache else None
    if path:
        try:
            with open(path) as f:
                return _from_json(json.load(f))
        except (OSError, ValueError, TypeError, KeyError):
            pass
    functions = parse(disassemble(cubin))
    if not functions:
        raise RuntimeError("cuobjdump -sass printed no instructions")
    out = hot_loop(max(functions.values(), key=len))
    if path:
        from fast_unet.files import FileError, atomic_write

        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # unique: two reports at once each install a whole entry
            atomic_write(path, lambda f: f.write(json.dumps({"loop": out}).encode()), sync=False, unique=True)
        except (OSError, FileError):  # a read-only or full cache folder: the result stands, uncached
            pass
    return out


def _from_json(entry):
    out = entry["loop"]
    if out is not None and not (isinstance(out, dict) and isinstance(out.get("insts"), int)):
        raise ValueError("not a loop entry")
    return out


@functools.lru_cache(maxsize=None)
def _source_hash():
    with open(__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def _cache_file(cubin):
    from fast_unet.tuning import cache_dir

    key = hashlib.sha256(bytes(cubin)).hexdigest()[:32]
    return os.path.join(cache_dir(), "sass", f"{_source_hash()}-{key}.json")
