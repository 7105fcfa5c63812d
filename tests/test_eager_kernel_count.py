"""bench.kernels' aten-op counter on the eager models (no Triton needed): meta against real CPU tensors,
and the bytes it assigns to single ops."""
import torch

from bench import kernels as bk

F32 = torch.float32


def _names(trace):
    # SDPA: meta stands for the GPU's fused op (efficient attention in float32); CPU runs its own fused
    # op. One op each, forward and backward.
    def norm(n):
        if "scaled_dot_product" in n:
            return "sdpa_backward" if "backward" in n else "sdpa"
        return n
    return [norm(x.name) for x in trace.launches]


def test_meta_count_matches_cpu_count():
    for name in ("baseline", "reference"):
        for step in bk.STEPS:
            meta = bk.trace_step(name, step, 1, 16, 16, F32, "meta")
            cpu = bk.trace_step(name, step, 1, 16, 16, F32, "cpu", dry=False)
            assert _names(meta) == _names(cpu), (name, step)
            assert len(meta.launches) > 0 and all(x.kind == "torch" for x in meta.launches)
            same = [(a.read_bytes, a.write_bytes) == (b.read_bytes, b.write_bytes)
                    for a, b in zip(meta.launches, cpu.launches) if "scaled_dot_product" not in a.name]
            assert all(same), (name, step)


def test_counts_are_stable_and_the_reference_launches_more():
    n = {}
    for name in ("baseline", "reference"):
        for step in bk.STEPS:
            a = bk.trace_step(name, step, 2, 16, 16, torch.bfloat16, "meta")
            b = bk.trace_step(name, step, 8, 16, 16, torch.bfloat16, "meta")
            assert [x.name for x in a.launches] == [x.name for x in b.launches]
            n[name, step] = len(a.launches)
    assert n["reference", "forward"] > n["baseline", "forward"] > 0
    assert n["baseline", "train"] > n["baseline", "forward"]
    names = [x.name for x in bk.trace_step("baseline", "forward", 2, 16, 16, torch.bfloat16, "meta").launches]
    assert names.count("aten._scaled_dot_product_flash_attention.default") == 6  # the GPU's fused op


def test_bytes_of_single_ops():
    trace = bk.Trace()
    a, b = torch.ones(64, 32), torch.ones(32)
    with bk.OpCounter(trace, "cpu"):
        c = a + b  # reads a (8192 B) and b (128 B), writes c
        a.add_(b)  # in place: a read and written
        c.copy_(a)  # overwrite: c written, a read
        a.t().reshape(-1)  # a transpose (view) and a copy: only the copy counts
        torch.empty_like(a)  # an allocation: not a kernel
        a.to("meta")  # a copy to another device: not a kernel on this one
        torch.cat([a[:32], a[32:]])  # two views of one storage: read once, capped at its size
    got = [(x.name, x.read_bytes, x.write_bytes) for x in trace.launches]
    assert got == [
        ("aten.add.Tensor", 8192 + 128, 8192),
        ("aten.add_.Tensor", 8192 + 128, 8192),
        ("aten.copy_.default", 8192, 8192),
        ("aten.clone.default", 8192, 8192),
        ("aten.cat.default", 8192, 8192),
    ]
    assert torch.equal(c, torch.full((64, 32), 2.0))  # not dry: the ops ran


def test_expanded_view_counts_its_storage_once():
    t = torch.zeros(1).expand(1000)
    (touched,) = bk.touched([("t", t)])
    assert touched.bytes == 4


def test_bench_prints_the_kernel_counts(tmp_path):
    """``python -m bench``'s kernel section: bench.kernels in a fresh process (TRITON_INTERPRET=1 set
    for it on the CPU), every default model counted, or the reason it was not."""
    import argparse

    from bench.__main__ import kernel_counts, kernel_table

    args = argparse.Namespace(batch=1, dtype="float32", json=str(tmp_path / "latest.json"))
    counts, why = kernel_counts(args, 16, 16, "cpu")
    assert why is None, why
    assert set(counts["models"]) == set(bk.DEFAULT_VARIANTS)
    for name, r in counts["models"].items():
        if "unavailable" in r:  # fast_unet without Triton: the reason is reported instead
            assert name.startswith("fast_unet")
            continue
        assert 0 < r["forward"]["launches"] < r["train"]["launches"]
    text = kernel_table({"kernel_counts": counts})
    assert "| baseline |" in text and "| fast_unet |" in text
    assert "not counted" in kernel_table({"kernel_counts_error": "no Triton"})
