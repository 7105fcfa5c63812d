"""The SASS loop parser (fast_unet/sass.py) on small synthetic listings: no Triton, no compile. The
compile report's loop columns on real builds: tests/test_aot.py."""
import re

from fast_unet import sass

# A cuobjdump -sass listing: an outer loop (0x30-0xd0) holding a tensor-core loop (0x40-0x80) and a
# compare-and-swap spin loop (0xa0-0xc0), a forward branch, and the self-branch after EXIT.
_SASS = """
\tcode for sm_90a
\t\tFunction : _k
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                       /* 0x00000a00ff017b82 */
                                                                                /* 0x000e700000000800 */
        /*0010*/              @!P0 BRA 0xe0 ;                                   /* 0x0000001400748947 */
        /*0020*/                   IMAD R2, R3, R4, RZ ;                        /* 0x0000000403027224 */
        /*0030*/                   ISETP.GE.AND P1, PT, R2, 0x10, PT ;          /* 0x000000100200780c */
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ; /* 0x00000000041879f0 */
        /*0050*/                   MUFU.EX2 R5, R5 ;                            /* 0x0000000500057308 */
        /*0060*/               @P1 MUFU.EX2 R6, R6 ;                            /* 0x0000000600061308 */
        /*0070*/                   FSEL R7, R5, RZ, P1 ;                        /* 0x000000ff05077208 */
        /*0080*/               @P1 BRA 0x40 ;                                   /* 0xfffffffc00f41947 */
        /*0090*/                   IADD3 R2, R2, 0x1, RZ ;                      /* 0x0000000102027810 */
        /*00a0*/                   ATOMG.E.CAS.STRONG.GPU PT, R8, [R10], R8, R9 ; /* 0x000000080a0873a9 */
        /*00b0*/                   ISETP.NE.AND P2, PT, R8, R9, PT ;            /* 0x000000090800720c */
        /*00c0*/               @P2 BRA 0xa0 ;                                   /* 0xfffffffc00f42947 */
        /*00d0*/              @!P0 BRA 0x30 ;                                   /* 0xfffffff400d48947 */
        /*00e0*/                   EXIT ;                                       /* 0x000000000000794d */
        /*00f0*/                   BRA 0xf0;                                    /* 0xfffffffc00fc7947 */
"""


def _nvdisasm_form(text):
    """The same listing as nvdisasm prints it: no encodings, branch targets as labels."""
    targets = sorted({int(t, 16) for t in re.findall(r"BRA (0x[0-9a-f]+)", text)})
    names = {t: f".L_x_{i}" for i, t in enumerate(targets)}
    out = []
    for line in text.splitlines():
        line = re.sub(r"\s*/\* 0x[0-9a-f]+ \*/", "", line)
        m = re.match(r"\s*/\*([0-9a-f]+)\*/", line)
        if m and int(m.group(1), 16) in names:
            out.append(names[int(m.group(1), 16)] + ":")
        line = re.sub(r"BRA (0x[0-9a-f]+)", lambda m: f"BRA `({names[int(m.group(1), 16)]})", line)
        if line.strip():
            out.append(line)
    return "\n".join(out).replace("Function : _k", ".text._k:")


def test_loops_on_a_synthetic_listing():
    """The parser and the loop rule without compiling anything: backward branches make loops (not the
    self-branch after EXIT, not the forward branch), nesting by address range, the hot loop is the one
    with the most tensor-core instructions, then the deepest; counts are static, predicated included."""
    for text in (_SASS, _nvdisasm_form(_SASS)):
        fns = sass.parse(text)
        assert list(fns) == ["_k"] and len(fns["_k"]) == 16
        assert fns["_k"][6] == (0x60, "MUFU.EX2", "@P1 MUFU.EX2 R6, R6")
        found = [(lp["start"], lp["end"], len(lp["body"]), lp["depth"]) for lp in sass.loops(fns["_k"])]
        assert found == [(0x30, 0xd0, 11, 0), (0x40, 0x80, 5, 1), (0xa0, 0xc0, 3, 1)]
        hot = sass.hot_loop(fns["_k"])
        assert (hot["start"], hot["end"], hot["insts"], hot["ex2"], hot["tensor_core"], hot["loops"]) == (
            0x40, 0x80, 5, 2, 1, 3)
        assert hot["ops"] == {"MUFU": 2, "HGMMA": 1, "FSEL": 1, "BRA": 1}
    # 4 warps over a 64 x 64 tile: per 1,024 scores, each warp's instructions once
    assert sass.per_units(hot, 4, 64 * 64) == {"insts": 5.0, "ex2": 2.0, "tensor_core": 1.0}
    assert sass.per_units(hot, 8, 128 * 64, per=1) == {"insts": 5 / 1024, "ex2": 2 / 1024, "tensor_core": 1 / 1024}


def _listing(ops):
    return "\n".join(f"        /*{16 * i:04x}*/                   {op} ;" for i, op in enumerate(ops))


def test_hot_loop_keeps_the_tensor_core_loop_around_a_retry_loop():
    """A compare-and-swap retry loop inside a tensor-core loop (an atomic the hardware has no instruction
    for, inside an attention loop) does not become the hot loop, with or without tensor-core work around
    it; no backward branch, no loop."""
    outer = _listing(["HGMMA.64x16x16.F32.BF16 R0, gdesc[UR4], R0", "FADD R1, R1, R2",
                      "ATOMG.E.CAS.STRONG.GPU PT, R8, [R10], R8, R9", "@P2 BRA 0x20", "FMUL R3, R3, R3",
                      "@P0 BRA 0x0", "EXIT", "BRA 0x70"])
    hot = sass.hot_loop(sass.parse(outer)[""])
    assert (hot["start"], hot["end"], hot["insts"], hot["tensor_core"], hot["loops"]) == (0, 0x50, 6, 1, 2)
    plain = outer.replace("HGMMA.64x16x16.F32.BF16 R0, gdesc[UR4], R0", "FFMA R0, R0, R1, R2")
    hot = sass.hot_loop(sass.parse(plain)[""])
    assert (hot["start"], hot["end"], hot["tensor_core"]) == (0, 0x50, 0)
    assert sass.hot_loop(sass.parse(_listing(["FADD R1, R1, R2", "@P0 BRA 0x30", "EXIT"]))[""]) is None


def test_hot_loop_is_an_innermost_tensor_core_loop():
    """Two K loops in a loop over taps (a concatenated input): the hot loop is the inner one with the most
    tensor-core instructions, not the tap loop that holds both; without tensor-core work, the longest
    innermost loop."""
    taps = _listing(["IMAD R2, R3, R4, RZ",                                          # 0x00 tap loop
                     "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24", "LDG.E R5, [R6]",  # 0x10 K loop 1
                     "@P1 BRA 0x10",                                                 # 0x30
                     "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24",                 # 0x40 K loop 2
                     "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24", "@P2 BRA 0x40",  # 0x50, 0x60
                     "@P0 BRA 0x0", "EXIT"])                                          # 0x70
    hot = sass.hot_loop(sass.parse(taps)[""])
    assert (hot["start"], hot["end"], hot["tensor_core"], hot["depth"], hot["loops"]) == (0x40, 0x60, 2, 1, 3)
    plain = taps.replace("HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24", "FFMA R24, R25, R26, R24").replace(
        "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24", "FFMA R24, R25, R26, R24")
    hot = sass.hot_loop(sass.parse(plain)[""])
    assert (hot["start"], hot["end"], hot["insts"]) == (0x10, 0x30, 3)  # longest innermost (ties: first)


def test_kernel_loop_caches_its_result_by_cubin(tmp_path, monkeypatch):
    """``kernel_loop`` keeps its result in the cache folder by the cubin's hash: a second call on the same
    bytes does not disassemble, other bytes do; an unreadable entry is analysed anew and rewritten;
    ``cache=False`` neither reads nor writes."""
    monkeypatch.setenv("FAST_UNET_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(sass, "disassemble", lambda cubin: calls.append(bytes(cubin)) or _SASS)
    first = sass.kernel_loop(b"cubin-a")
    assert first["tensor_core"] == 1 and calls == [b"cubin-a"]
    assert sass.kernel_loop(b"cubin-a") == first and calls == [b"cubin-a"]
    assert sass.kernel_loop(b"cubin-b") == first and calls == [b"cubin-a", b"cubin-b"]
    entries = sorted((tmp_path / "sass").iterdir())
    assert len(entries) == 2 and not any(p.suffix == ".tmp" for p in entries)
    for p in entries:
        p.write_text('{"loop": "not a loop"')
    assert sass.kernel_loop(b"cubin-a") == first and len(calls) == 3
    assert sass.kernel_loop(b"cubin-a") == first and len(calls) == 3
    assert sass.kernel_loop(b"cubin-a", cache=False) == first and len(calls) == 4
    monkeypatch.setattr(sass, "disassemble", lambda cubin: _listing(["FADD R1, R1, R2", "EXIT"]))
    assert sass.kernel_loop(b"no-loop") is None and sass.kernel_loop(b"no-loop") is None
