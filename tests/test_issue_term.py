"""The estimate's instruction-issue and L2 terms (``python -m bench.estimate``; bench/issue.py, bench/work.py):
the attention loops' work and L2 traffic from a launch's shapes and constexprs, a launch matched to the
build of the compile report it compiles to, the issue time of Triton launches and SDPA's floor, and the
loop counts compiled once and then read from the cache. Only the last compiles (one build, sm_90)."""
import json
import os

import pytest
import torch

from bench import estimate, work

pytest.importorskip("triton")


def _qkv(b=2, n=4096, h=4, d=16, dtype=torch.bfloat16):
    return torch.empty(b, n, 3, h, d, dtype=dtype, device="meta")


@pytest.mark.parametrize("name", ["_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_bwd"])
def test_attention_loop_work_and_l2(name):
    """Every attention kernel visits each (query tile, key tile) pair once; its loop re-reads the streamed
    tiles from L2 (K and V per key tile for the forward and dQ; Q, dO, lse and delta per query tile for the
    key-tile kernels), and the one-pass backward adds dQ in float32 per key tile: N / BLOCK_N x N x D x 4
    bytes x 2 per (batch, head)."""
    b, n, h, d, bm, bn = 2, 4096, 4, 16, 64, 128
    t = {"qkv_ptr": _qkv(b, n, h, d)}
    args = dict(N=n, H=h, D=d, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    loop, l2 = work.triton_loop(name, t, args, [n // bn, b * h])
    pairs = b * h * (n // bm) * (n // bn)
    assert loop == {"iterations": pairs, "scores": b * h * n * n, "head_dim": d}
    if name in ("_attn_fwd", "_attn_bwd_dq"):
        assert l2 == pairs * bn * 2 * d * 2
    else:
        streamed = pairs * bm * (2 * d * 2 + 8)
        atomics = b * h * (n // bn) * n * d * 4 * 2
        assert l2 == streamed + (atomics if name == "_attn_bwd" else 0)
    assert work.triton_loop("_attn_bwd_preprocess", t, dict(D=d, BLOCK_M=64), [64, 8]) == (None, 0)


def test_forward_counts_the_rescale_exponentials():
    """alpha = exp2(m_old - m_new): BLOCK_M exponentials per (query tile, key tile), on top of one per score."""
    b, n, h, d = 1, 1000, 2, 32
    t = {"qkv_ptr": _qkv(b, n, h, d)}
    flops, exps, unit, known = work.triton_work("_attn_fwd", t, dict(BLOCK_M=64, BLOCK_N=32))
    assert (flops, unit, known) == (4 * b * h * n * n * d, "mma16", True)
    assert exps == b * h * n * n + b * h * 16 * 32 * 64  # cdiv(1000, 64) = 16, cdiv(1000, 32) = 32
    assert work.triton_work("_attn_fwd", t)[1] == b * h * n * n  # no constexprs recorded: scores only


def test_column_sum_stages_count_their_adds():
    """``_col_partial_sum_kernel`` and ``_col_sum_split_kernel`` fold an (R, W) float32 array of partials: one
    CUDA-core add per element."""
    p = torch.empty(37, 96)
    named = {"p_ptr": p, "o_ptr": torch.empty(7, 96)}
    assert work.triton_work("_col_partial_sum_kernel", named) == (37 * 96, 0, "fp32", True)
    named = {"p_ptr": p, "dlw_ptr": torch.empty(32), "dlb_ptr": torch.empty(32), "db_ptr": torch.empty(32)}
    assert work.triton_work("_col_sum_split_kernel", named) == (37 * 96, 0, "fp32", True)


def test_gelu_backward_gemm_counts_the_recomputed_pre_activation():
    """With GELU the LayerNorm-backward GEMM forms the pre-activation again (a second GEMM of the same size)
    and one exp per element of d."""
    named = {"d_ptr": torch.empty(100, 48, dtype=torch.bfloat16), "w_ptr": torch.empty(48, 64, dtype=torch.bfloat16)}
    assert work.triton_work("_ln_linear_bwd_kernel", named, dict(GELU=False)) == (2 * 100 * 48 * 64, 0, "mma16", True)
    assert work.triton_work("_ln_linear_bwd_kernel", named, dict(GELU=True)) == (4 * 100 * 48 * 64, 4800, "mma16", True)


def test_other_loops_count_iterations_over_all_programs():
    loop, l2 = work.triton_loop("_conv3x3_kernel", {}, dict(C1=64, C_in=96, HAS_X2=True, BLOCK_K=32), [8, 2, 4])
    assert loop == {"iterations": 64 * 9 * (2 + 1)} and l2 == 0
    assert work.triton_loop("_linear_kernel", {}, dict(K=100, BLOCK_K=32), [6, 2])[0] == {"iterations": 48}
    assert work.triton_loop("_no_such_kernel", {}, {}, [1]) == (None, 0)


def _match_args(build):
    """A launch's arguments and pointer dtypes for ``build``: its constexprs and options, the ints it leaves
    unaligned (``unaligned_ints``) 3, other ints 4096."""
    from fast_unet import aot

    label, fn, config, dtype, ce, opts = build
    sig = aot._signature(fn, dtype, ce, opts.get("arg_types", {}))
    names = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "i64": "int64", "i32": "int32"}
    odd = set(opts.get("unaligned_ints", ()))
    args = {n: (ce[n] if n in ce else 0.5 if t == "fp32" else 3 if n in odd else 4096)
            for n, t in sig.items() if not t.startswith("*")}
    args.update(num_warps=opts.get("num_warps", 4), num_stages=opts.get("num_stages", 3))
    return args, {n: names[t[1:]] for n, t in sig.items() if t.startswith("*")}


def test_every_attention_and_conv_build_is_matched_by_its_own_launch():
    """``issue.match``: a launch with a build's constexprs, warps, stages and pointer dtypes compiles to
    that build (or one with the same constexprs, options and dtype): the conv's plain builds by the
    alignment of the ints the launch passes (C_in = 3 to the twin labelled "unaligned", 4096 to the one
    that marks it a multiple of 16, as the JIT does)."""
    from bench import issue
    from fast_unet import aot

    builds = aot.builds()
    picked = [b for b in builds if b[0].startswith(("attn", "conv"))]
    assert picked
    for b in picked:
        args, dtypes = _match_args(b)
        got = issue.match(getattr(b[1], "fn", b[1]).__name__, args, dtypes, builds)
        assert got is not None and (got[0], got[3], got[4], got[5]) == (b[0], b[3], b[4], b[5]), (b[2], got and got[2])


class _Counts:
    """LoopCounts' interface with fixed numbers: every build 100 instructions per iteration per warp, 64x64
    tiles; attention builds at d=16 bf16 with 300 and 250 warp instructions per 1,024 scores."""
    notes = set()

    def builds(self):
        return [("attn_a", None, "a", "bfloat16", dict(D=16), {}), ("attn_b", None, "b", "bfloat16", dict(D=16), {})]

    def attention_builds(self, dtype, head_dim):
        return self.builds() if (dtype, head_dim) == ("bfloat16", 16) else []

    def columns(self, build):
        if build[0] == "attn_a":
            return {"insts_per_1k": 300.0, "loop_insts": 300.0}, "cache"
        if build[0] == "attn_b":
            return {"insts_per_1k": 250.0, "loop_insts": 250.0}, "cache"
        return {"loop_insts": 100.0, "insts_per_1k": 100.0}, "compiled"


def test_issue_time_of_a_triton_loop_and_of_sdpa():
    """A Triton launch issues its loop's instructions x num_warps x iterations; SDPA, per score, as many
    as fast_unet's best attention build at its head dim and dtype (here 250 per 1,024); the launch takes
    the largest of its terms, issue included, plus the launch overhead."""
    iss = estimate.Issue("auto")
    iss.counts = _Counts()
    iss.build = lambda ln: ("conv", None, "c", "bfloat16", {}, {"num_warps": 8})
    tri = dict(kind="triton", name="_k", read_bytes=0, write_bytes=0, flops=0, unit=None, exps=0, known=True,
               l2_bytes=0, loop={"iterations": 1000}, args={}, dtypes={}, dtype="bfloat16", insts=0, insts_from=None)
    sdpa = dict(tri, kind="torch", name="aten._scaled_dot_product_flash_attention.default",
                loop={"scores": 2 * 4096 * 4096, "head_dim": 16, "sdpa": True})
    other = dict(sdpa, loop={"scores": 1024, "head_dim": 64, "sdpa": True})
    iss.attach([tri, sdpa, other])
    assert (tri["insts"], tri["insts_from"]) == (100.0 * 8 * 1000, "compiled")
    assert (sdpa["insts"], sdpa["insts_from"]) == (250.0 * 2 * 4096 * 4096 / 1024, "floor: attn_b")
    assert other["insts"] == 0  # no fast_unet build at that head dim: no floor, no term
    c = estimate.H200
    t, bound = estimate.launch_time(dict(sdpa, read_bytes=10, flops=1, unit="mma16", exps=1, l2_bytes=10), c)
    assert bound == "issue" and t == pytest.approx(sdpa["insts"] / c["issue_per_s"] + c["launch_s"])
    t, bound = estimate.launch_time(dict(tri, insts=0, l2_bytes=10**9), c)
    assert bound == "l2" and t == pytest.approx(1e9 / c["l2_bytes_per_s"] + c["launch_s"])


def test_graphed_step_differs_by_the_launch_costs_only():
    """A step replayed from a CUDA graph: each launch's time at the ceilings plus ``graph_launch_s`` in
    place of ``launch_s``; the rest of the totals are the eager step's."""
    c = dict(estimate.H200, launch_s=5e-6, graph_launch_s=2e-6)
    base = dict(kind="triton", name="_k", read_bytes=0, write_bytes=0, flops=0, unit=None, exps=0, known=True,
                l2_bytes=0, loop=None, args={}, dtypes={}, dtype="bfloat16", insts=0, insts_from=None)
    lns = [dict(base, read_bytes=4.3e6), dict(base, name="_j", flops=2 * 989.4e6, unit="mma16"),
           dict(base, name="_i")]
    t, bound = estimate.launch_time(lns[0], c, "graph_launch_s")
    assert bound == "memory" and t == pytest.approx(1e-6 + 2e-6)
    s = estimate.estimate_step(lns, c)
    assert s["est_s"] == pytest.approx(1e-6 + 2e-6 + 3 * 5e-6) and s["launch_s"] == pytest.approx(15e-6)
    assert s["graph_est_s"] == pytest.approx(1e-6 + 2e-6 + 3 * 2e-6) and s["graph_launch_s"] == pytest.approx(6e-6)
    assert estimate.H200["graph_launch_s"] < estimate.H200["launch_s"]


def test_summary_table_gives_both_launch_modes_against_the_baseline():
    """The table's eager ratio is eager over eager, its graphed ratio graphed over graphed."""
    def step(est, graph):
        return dict(launches=1, bytes=0, flops=0, exps=0, insts=0, bound_s=dict.fromkeys(estimate.BOUNDS, 0.0),
                    launch_s=0.0, est_s=est, graph_est_s=graph, graph_launch_s=0.0, attention_s=0.0,
                    unknown=[], insts_from={})
    row = {"batch": 2, "height": 8, "width": 8, "models": {
        "fast_unet": {"forward": step(1e-3, 0.5e-3), "train": step(2e-3, 1e-3)},
        "baseline": {"forward": step(3e-3, 2e-3), "train": step(5e-3, 4e-3)}}}
    text = estimate.summary_table([row], "bfloat16")
    header = next(ln for ln in text.splitlines() if ln.startswith("| B |"))
    cols = [x.strip() for x in header.strip("|").split("|")]
    fu = next(ln for ln in text.splitlines() if "| fast_unet | train |" in ln)
    vals = dict(zip(cols, [x.strip() for x in fu.strip("|").split("|")]))
    assert (vals["vs baseline"], vals["graphed vs baseline"]) == ("2.50x", "4.00x")
    assert (vals["estimate ms"], vals["graphed estimate ms"]) == ("2.000", "1.000")


def test_ceilings_share_one_clock():
    """The SFU, issue, L2 and fp32 rates are per-clock figures at the clock the tensor-core figure implies."""
    c = estimate.H200
    assert c["clock_hz"] == pytest.approx(c["mma16_flops_per_s"] / (c["sms"] * 4096))
    assert c["sfu_exps_per_s"] == pytest.approx(c["sms"] * 16 * c["clock_hz"])
    assert c["issue_per_s"] == pytest.approx(c["sms"] * 4 * c["clock_hz"])
    assert c["l2_bytes_per_s"] == pytest.approx(5120 * c["clock_hz"])
    assert set(estimate.SOURCES) == set(c)


def test_loop_counts_compile_once_then_come_from_the_cache(tmp_path, monkeypatch):
    """bench/issue.py: a build not in the cache is compiled (a subprocess without TRITON_INTERPRET), its
    loop columns are cached under the kernel sources' fingerprint, and read back without compiling;
    ``table`` mode gives the fallback figures for today's attention kernels only."""
    from bench import issue

    monkeypatch.setenv("FAST_UNET_CACHE_DIR", str(tmp_path))
    counts = issue.LoopCounts("auto")
    build = next(b for b in counts.builds() if b[0] == "attn_fwd" and b[2].startswith("bfloat16 d=16"))
    counts.prepare([(build[0], build[2])])
    cols, src = counts.columns(build)
    assert src == "compiled" and cols["loop_insts"] > 0 and cols["loop_unit"] == "scores", (cols, counts.notes)
    data = json.loads((tmp_path / "loop_counts.json").read_text())
    assert list(data) == [issue.fingerprint()] and issue.key(build[0], build[2]) in data[issue.fingerprint()]

    again = issue.LoopCounts("auto")
    monkeypatch.setattr(issue, "compile_counts", lambda *a, **k: pytest.fail("compiled a cached build"))
    again.prepare([(build[0], build[2])])
    assert again.columns(build) == (cols, "cache")

    table = issue.LoopCounts("table")
    cols, src = table.columns(build)
    fn = getattr(build[1], "fn", build[1]).__name__
    if (fn, "bfloat16", 16) in issue.FALLBACK:
        assert src == "table" and cols["insts_per_1k"] == issue.FALLBACK[(fn, "bfloat16", 16)]
    assert table.columns(next(b for b in table.builds() if b[0].startswith("conv"))) == (None, None)
    assert os.path.exists(issue.cache_path())
