"""Ahead-of-time compile report: every Triton kernel, in every config its launcher can pick, for GPUs
that are not here (``python -m fast_unet.info --compile sm_80,sm_90 [--json]``).

Each build is ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` with the
signature the launcher's call produces at the model's shapes (pointers 16-byte aligned, the attention's
``stride_d == 1`` specialised as the JIT does). Registers and spills (STACK > 0) come from
``cuobjdump --dump-resource-usage`` on the cubin, shared memory from the kernel's metadata, tensor
cores from the PTX (``wgmma`` / ``mma.sync``). TRITON_INTERPRET must be unset: the interpreter's
kernels cannot be compiled.

The ``triton.compile`` call form used here is the one that works on Triton 3.6, 3.8 and 3.9; keep
every use of it in ``compile_one``.
"""
import os
import re
import subprocess
import tempfile

FP32_POINTERS = {"part_ptr", "pin_ptr", "dlw_ptr", "dlb_ptr", "mean_ptr", "rstd_ptr", "lse_ptr", "delta_ptr", "dwb_ptr", "dbb_ptr",
                 "sums_ptr", "freq_ptr", "drw_ptr", "drb_ptr", "dsw_ptr", "dsb_ptr"}
FLOAT_ARGS = {"qk_scale", "sm_scale", "eps", "scale_h", "scale_w"}
# multiples of 16 at the model's shapes (the JIT specialises such ints; the conv's x strides are those of
# channels_last activations with C_in >= 64)
ALIGNED_INTS = {"stride_b", "stride_n", "stride_t", "stride_h", "C", "C1", "C_in", "stride_xb", "stride_xh",
                "stride_xw", "stride_x2b", "stride_x2h", "stride_x2w"}
TRITON_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _signature(fn, dtype, constexprs, t_type="i64"):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "t_ptr":
            sig[name] = "*" + t_type
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in FP32_POINTERS else "*" + TRITON_DTYPE[dtype]
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def builds():
    """[(kernel name, jit fn, config label, dtype name, constexprs, options)] for every launchable config."""
    from fast_unet.kernels import attention as A
    from fast_unet.kernels import conv as CV
    from fast_unet.kernels import group_norm as G
    from fast_unet.kernels import ln_backward as LB
    from fast_unet.kernels import resample as R
    from fast_unet.kernels import time_embedding as T

    out = []
    dtypes = ("float32", "bfloat16", "float16")
    for dt in dtypes:
        for d in A.HEAD_DIMS:
            ieee = dt == "float32"
            for name, fn, key in (("attn_fwd", A._attn_fwd, "fwd"), ("attn_bwd_dkdv", A._attn_bwd_dkdv, "dkdv"),
                                  ("attn_bwd_dq", A._attn_bwd_dq, "dq")):
                bm, bn, warps, stages = A.config(key, d, dt)
                ce = dict(stride_d=1, D=d, BLOCK_M=bm, BLOCK_N=bn, IEEE=ieee)
                out.append((name, fn, f"{dt} d={d} {bm}x{bn} w{warps} s{stages}", dt, ce,
                            dict(num_warps=warps, num_stages=stages)))
            bm, _, warps, _ = A.config("preprocess", d, dt)
            out.append(("attn_bwd_preprocess", A._attn_bwd_preprocess, f"{dt} d={d} {bm} w{warps}", dt,
                        dict(D=d, BLOCK_M=bm), dict(num_warps=warps)))
        for cl, tiles in G.TILE_CONFIGS.items():
            lay = "channels_last" if cl else "nchw"
            for bc, bhw in tiles:
                tile = f"{dt} {lay} {bc}x{bhw} w{G.NUM_WARPS}"
                common = dict(CHANNELS_LAST=cl, BLOCK_C=bc, BLOCK_HW=bhw)
                opts = dict(num_warps=G.NUM_WARPS)
                out.append(("gn_stats", G._gn_stats_kernel, tile, dt, dict(common), opts))
                for has_emb in (True, False):
                    out.append(("gn_apply", G._gn_apply_kernel, tile + (" emb" if has_emb else ""), dt,
                                dict(common, HAS_EMB=has_emb), opts))
                    if cl:  # the fused path's tensors are channels_last
                        out.append(("gn_apply_partials", G._gn_apply_partials_kernel,
                                    tile + (" emb" if has_emb else ""), dt,
                                    dict(common, HAS_EMB=has_emb, BLOCK_P=G.PARTIALS_BLOCK_P), opts))
                out.append(("gn_bwd_reduce", G._gn_bwd_reduce_kernel, tile, dt, dict(common), opts))
                out.append(("gn_bwd_dx", G._gn_bwd_dx_kernel, tile, dt, dict(common), opts))
        kind = "float32" if dt == "float32" else "half"
        for (bm, bn, bk, warps, stages), is_pool in sorted({(c, key[1] == "pool") for key, c in CV.CONFIGS.items()
                                                            if key[0] == kind}):
            # input variants: plain (NCHW model input, strided), normalise on load, concat on load,
            # max-pool on load
            variants = (("plain", False, False, {}), ("norm-on-load", True, False, dict(stride_xc=1)),
                        ("concat", False, True, dict(stride_xc=1)),
                        ("pool-on-load", False, False, dict(stride_xc=1, POOL_IN=True)))
            if kind == "float32":  # float32 pool-on-load has its own config ("pool"), the others share one
                variants = [v for v in variants if (v[0] == "pool-on-load") == is_pool]
            for variant, norm_in, has_x2, ce_x in variants:
                out.append(("conv3x3_gn", CV._conv3x3_kernel,
                            f"{dt} {variant} {bm}x{bn}x{bk} w{warps} s{stages}", dt,
                            # stride_wc == 1: the model's channels_last weight, specialised as the JIT does
                            dict(dict(POOL_IN=False), **ce_x, stride_wc=1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                 IEEE=dt == "float32", NORM_IN=norm_in, HAS_X2=has_x2, BLOCK_P=CV.NORM_BLOCK_P),
                            dict(num_warps=warps, num_stages=stages)))
        bp, bc, warps = R.CONFIG
        out.append(("gn_relu_pool", R._gn_relu_pool_kernel, f"{dt} {bp}x{bc} w{warps}", dt,
                    dict(BLOCK_P=bp, BLOCK_C=bc, BLOCK_P_IN=R.BLOCK_P_IN), dict(num_warps=warps)))
        for norm_in in (False, True):
            out.append(("upsample2x", R._upsample2x_kernel,
                        f"{dt} {'norm-on-load ' if norm_in else ''}{bp}x{bc} w{warps}", dt,
                        dict(stride_xc=1, NORM_IN=norm_in, BLOCK_P=bp, BLOCK_C=bc, BLOCK_P_IN=R.BLOCK_P_IN),
                        dict(num_warps=warps)))
        out.append(("gn_bwd_param", G._gn_bwd_param_kernel, f"{dt} 128 w4", dt, dict(BLOCK_C=128),
                    dict(num_warps=4)))
        for (kind, kf), (bm, bn, warps, stages) in sorted(LB.CONFIGS.items()):
            if (kind == "float32") == (dt == "float32"):
                out.append(("ln_linear_bwd", LB._ln_linear_bwd_kernel, f"{dt} K<={kf} {bm}x{bn} w{warps} s{stages}",
                            dt, dict(stride_wi=1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_KF=kf, IEEE=dt == "float32"),
                            dict(num_warps=warps, num_stages=stages)))
        out.append(("gn_bwd_combine", G._gn_bwd_combine_kernel, f"{dt} 128 w4", dt, dict(BLOCK_C=128),
                    dict(num_warps=4)))
        for name, fn, tcfg in (("temb_fwd", T._temb_fwd_kernel, T.FWD_CONFIG), ("temb_bwd", T._temb_bwd_kernel, T.BWD_CONFIG)):
            ce = {k: v for k, v in tcfg.items() if k.startswith("BLOCK")}
            opts = {k: v for k, v in tcfg.items() if k.startswith("num_")}
            for t_type in ("i64", "i32", "fp32"):  # the timesteps' dtype is part of the JIT's key
                label = (f"{dt} t:{t_type} {ce['BLOCK_B']}x{ce['BLOCK_O']}x{ce['BLOCK_K']} "
                         f"w{opts['num_warps']} s{opts['num_stages']}")
                out.append((name, fn, label, dt, dict(ce, IEEE=dt == "float32"), dict(opts, t_type=t_type)))
    out.append(("gn_combine", G._gn_combine_kernel, "128 w4", "float32", dict(BLOCK_P=128), dict(num_warps=4)))
    out += _linear_builds()
    return out


# The token-GEMM kernel's float arguments, and its integers that are multiples of 16 at the model's shapes
# (K = C in 64, 128, 256; N_out in C, 3C; weight row stride K).
FLOAT_ARGS.update({"ln_eps", "gn_eps"})
ALIGNED_INTS.update({"K", "N_out", "stride_wo"})


def _linear_builds():
    """kernels/linear.py: each config ``linear.config`` can pick, for each op's flags (linear_residual,
    ln_linear with and without GELU, gn_ln_linear with and without emb). The weight is read with
    stride_wi == 1 and emb with stride_ec == 1 (nn.Linear's weight; a column slice of the stacked time
    embedding), specialised as the JIT does."""
    from fast_unet.kernels import linear as L

    ops = (("linear_residual", dict(PROLOGUE=0, HAS_EMB=False, GELU=False, RESIDUAL=True), ""),
           ("ln_linear", dict(PROLOGUE=1, HAS_EMB=False, GELU=False, RESIDUAL=False), ""),
           ("ln_linear", dict(PROLOGUE=1, HAS_EMB=False, GELU=True, RESIDUAL=False), " gelu"),
           ("gn_ln_linear", dict(PROLOGUE=2, HAS_EMB=True, GELU=False, RESIDUAL=False), " emb"),
           ("gn_ln_linear", dict(PROLOGUE=2, HAS_EMB=False, GELU=False, RESIDUAL=False), ""))
    out = []
    for dt in ("float32", "bfloat16", "float16"):
        kind = "float32" if dt == "float32" else "half"
        for bm, bn, bk, warps, stages in sorted({c for (k, _), c in L.CONFIGS.items() if k == kind}):
            for name, flags, tag in ops:
                ce = dict(flags, stride_wi=1, stride_ec=1, IEEE=dt == "float32", BLOCK_M=bm, BLOCK_N=bn,
                          BLOCK_K=bk, BLOCK_P=L.BLOCK_P)
                out.append((name, L._linear_kernel, f"{dt} {bm}x{bn}x{bk} w{warps} s{stages}{tag}", dt,
                            ce, dict(num_warps=warps, num_stages=stages)))
    return out


def _cuobjdump():
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else "cuobjdump"


def compile_one(fn, dtype, constexprs, options, arch):
    """Compile one build for ``sm_<arch>``; returns (compiled kernel, signature)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = dict(options)
    sig = _signature(fn, dtype, constexprs, options.pop("t_type", "i64"))
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
               if sig[n].startswith("*") or n in ALIGNED_INTS}
    target = GPUTarget("cuda", arch, 32)
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=aligned)
        return triton.compile(src, target=target, options=options)
    except Exception:  # an attrs form this Triton does not take: compile without the alignment hints
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
        return triton.compile(src, target=target, options=options)


def resources(kernel):
    """{regs, spill_bytes, shared_bytes, tensor_cores} of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)", text)
    if m is None:
        raise RuntimeError(f"cannot read cuobjdump's resource usage:\n{text}")
    ptx = kernel.asm["ptx"]
    tc = [name for name, pat in (("wgmma", r"\bwgmma\."), ("mma", r"\bmma\.sync\.")) if re.search(pat, ptx)]
    return {"regs": int(m.group(1)), "spill_bytes": int(m.group(2)), "shared_bytes": int(kernel.metadata.shared),
            "tensor_cores": "+".join(tc) if tc else "no"}


def parse_archs(text):
    """"sm_80,sm_90" -> [80, 90]."""
    archs = []
    for part in text.split(","):
        part = part.strip().lower()
        m = re.fullmatch(r"(?:sm_?)?(\d+)a?", part)
        if not m:
            raise ValueError(f"--compile takes archs like sm_80,sm_90; got {part!r}")
        archs.append(int(m.group(1)))
    return archs


def report(archs, kernels=None, progress=None):
    """One dict per (build, arch): kernel, config, arch, regs, spill_bytes, shared_bytes, tensor_cores."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the compile report needs TRITON_INTERPRET unset (interpreted kernels cannot be compiled)")
    all_builds = builds()
    unknown = set(kernels or ()) - {b[0] for b in all_builds}
    if unknown:
        raise ValueError(f"unknown kernel(s) {sorted(unknown)}; known: {sorted({b[0] for b in all_builds})}")
    rows = []
    for name, fn, label, dtype, ce, opts in all_builds:
        if kernels and name not in kernels:
            continue
        for arch in archs:
            row = {"kernel": name, "config": label, "arch": f"sm_{arch}"}
            try:
                row.update(resources(compile_one(fn, dtype, ce, opts, arch)))
            except Exception as e:  # report, do not stop: one failing build must not hide the others
                row.update(regs=None, spill_bytes=None, shared_bytes=None, tensor_cores=None,
                           error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            rows.append(row)
            if progress:
                progress(row)
    return rows


def format_table(rows):
    head = ("kernel", "config", "arch", "regs", "spill_bytes", "shared_bytes", "tensor_cores")
    cells = [head] + [tuple("ERROR: " + r["error"] if (k == "regs" and r.get("error")) else str(r.get(k, ""))
                            for k in head) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["| " + " | ".join(c[i].ljust(widths[i]) for i in range(len(head))) + " |" for c in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
