"""Fused attention on every backend against its float64 definition."""
import pytest
import torch

import ldmfast.ops as ops
from ldmfast.ops.attention import _heads_view
from numerics import BACKEND_CASES, assert_matches, split_case

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [16, 32, 40, 64, 80, 128, 256, 512]


def make_qkv(b, h, lq, lk, d, dtype, device, layout="bhld", seed=None):
    g = torch.Generator().manual_seed(torch.seed() % 2**31 if seed is None else seed)

    def one(length):
        if layout == "blhd":  # a (B, L, H, D) buffer read as (B, H, L, D) in place
            return torch.randn(b, length, h, d, generator=g, dtype=torch.float64).transpose(1, 2)
        return torch.randn(b, h, length, d, generator=g, dtype=torch.float64)

    return [t.to(device=device, dtype=dtype) for t in (one(lq), one(lk), one(lk))]


def plain_torch(q, k, v, scale):
    """matmul-softmax-matmul in the inputs' own precision."""
    return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1) @ v


def check_forward(case, dtype, b, h, lq, lk, d, layout="bhld"):
    device, backend = split_case(case)
    q, k, v = make_qkv(b, h, lq, lk, d, dtype, device, layout)
    scale = d ** -0.5
    ref, _ = ops.attention_reference(q.double(), k.double(), v.double(), scale)
    with ops.use_backend(backend), ops.poison_outputs():
        out = ops.attention(q, k, v)
    assert out.dtype == dtype
    assert_matches(out, ref, dtype, f"out (D={d}, Lq={lq}, Lk={lk})", torch_lowp=plain_torch(q, k, v, scale))


@pytest.mark.parametrize("case", BACKEND_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_head_dims(case, dtype, d):
    check_forward(case, dtype, 2, 3, 7, 13, d)


@pytest.mark.parametrize("case", BACKEND_CASES)
@pytest.mark.parametrize("lq,lk", [(1, 1), (1, 7), (7, 7), (168, 168), (672, 672), (168, 37), (128, 64)])
def test_lengths(case, lq, lk):
    check_forward(case, torch.float32, 1, 2, lq, lk, 32)


# Triton's CPU interpreter takes minutes at 2688 x 2688 x 512: that case runs in the slow set.
FAST_AT_2688 = [c for c in BACKEND_CASES if c.values[0] != "cpu:triton"]


@pytest.mark.parametrize("case", FAST_AT_2688)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vqgan_middle_block_length(case, dtype):
    """One head of 512 channels over 2688 tokens (48 x 56), as the VQGAN's middle block attends."""
    check_forward(case, dtype, 1, 1, 2688, 2688, 512)


@pytest.mark.slow
@pytest.mark.parametrize("case", BACKEND_CASES)
def test_vqgan_middle_block_length_slow(case):
    check_forward(case, torch.float32, 1, 1, 2688, 2688, 512)


@pytest.mark.parametrize("case", BACKEND_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_blhd_views_are_read_in_place(case, dtype):
    check_forward(case, dtype, 2, 4, 33, 21, 40, layout="blhd")


@pytest.mark.parametrize("case", BACKEND_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# (128, 64 at D=32: whole tiles, the Triton kernels' unmasked path; one head of 300 queries: the CPU
# backend splits its query tiles among threads, in tiles of 72 to 80 rows)
@pytest.mark.parametrize("b,h,lq,lk,d", [(2, 3, 37, 29, 32), (1, 2, 20, 70, 80), (1, 1, 9, 17, 512),
                                         (1, 2, 128, 64, 32), (1, 1, 300, 200, 40)])
def test_gradients(case, dtype, b, h, lq, lk, d):
    check_gradients(case, dtype, b, h, lq, lk, d)


@pytest.mark.parametrize("case", [c for c in BACKEND_CASES if c.values[0].endswith("triton")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("epilogue", [True, False], ids=["gemm-accumulates", "separate-add"])
def test_wide_heads_in_chunks(case, dtype, epilogue, monkeypatch):
    """16-bit heads over 256 wide take attention_wide's GEMMs, forward and backward: several query
    chunks (a small budget), several batch-heads, Lq != Lk, (B, L, H, D) views, head dims 512 and
    300; on a GPU both ways of summing dk and dv over chunks (in the GEMM, or after it where
    baddbmm cannot). (float32 keeps the flash-style kernels, which test_gradients covers at 512.)"""
    from ldmfast.ops import attention_wide
    calls = []
    for cache in ("_F32_OUT_BMM", "_F32_OUT_BADDBMM"):  # (applies() probes again, as patched)
        monkeypatch.setattr(attention_wide, cache, {})
    monkeypatch.setattr(attention_wide, "_accumulates_in_place", lambda *args: epilogue)
    monkeypatch.setattr(attention_wide, "CHUNK_BUDGET", 2 << 10)
    for name in ("forward", "backward"):
        real = getattr(attention_wide, name)
        monkeypatch.setattr(attention_wide, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    q = torch.empty(2, 2, 23, 512, dtype=dtype)
    assert attention_wide.chunk_rows(2 * 2, 23, 19, attention_wide.score_bytes(q, backward=False)) < 23  # chunks
    if dtype == torch.bfloat16:  # (the forward takes the backward's chunks: same GEMM shapes)
        assert attention_wide._chunks(q, q, backward=False) == attention_wide._chunks(q, q, backward=True)
    check_gradients(case, dtype, 2, 2, 23, 19, 512, layout="blhd")
    check_gradients(case, dtype, 1, 3, 11, 40, 300)
    check_forward(case, dtype, 2, 2, 23, 19, 512, layout="blhd")
    assert calls == ["forward", "backward"] * 2 + ["forward"]
    assert not attention_wide.applies(torch.empty(1, 1, 1, 512)) and not attention_wide.applies(
        torch.empty(1, 1, 1, 256, dtype=dtype))


@pytest.mark.parametrize("case", [c for c in BACKEND_CASES if c.values[0].endswith("triton")])
def test_wide_heads_fall_back_to_the_kernels(case, monkeypatch):
    """A failure of the chunked GEMMs (here: a forward that raises) warns once and runs the
    flash-style kernels, with the right result, from then on on that device."""
    from ldmfast.ops import attention_wide
    monkeypatch.setattr(attention_wide, "_FAILED", {})

    def broken(*args):
        raise RuntimeError("no luck")

    monkeypatch.setattr(attention_wide, "forward", broken)
    with pytest.warns(UserWarning, match="no luck"):
        check_gradients(case, torch.bfloat16, 1, 2, 9, 17, 512)
    assert not attention_wide.applies(torch.empty(1, 1, 1, 512, dtype=torch.bfloat16,
                                                  device=split_case(case)[0]))


@pytest.mark.parametrize("case", [c for c in BACKEND_CASES if c.values[0].endswith("triton")])
def test_wide_heads_out_of_memory_runs_the_kernels_for_that_shape(case, monkeypatch):
    """Chunk buffers that do not fit: the flash-style kernels run, silently, and later calls of that
    shape do not try the GEMMs again; another shape still does."""
    from ldmfast.ops import attention_wide
    monkeypatch.setattr(attention_wide, "_OUT_OF_MEMORY", set())
    tries = []

    def out_of_memory(*args):
        tries.append(args[0].shape)
        raise torch.cuda.OutOfMemoryError("no room")

    monkeypatch.setattr(attention_wide, "forward", out_of_memory)
    for _ in range(2):
        check_forward(case, torch.bfloat16, 1, 2, 9, 17, 512)
    check_forward(case, torch.bfloat16, 1, 2, 10, 17, 512)
    assert [s[2] for s in tries] == [9, 10]


@pytest.mark.parametrize("case", [c for c in BACKEND_CASES if c.values[0].endswith("triton")])
def test_backward_kernels_take_their_own_tiles(case, monkeypatch):
    """The dk/dv and dq kernels launch with tile shapes of their own where a sweep sets them
    (bench/sweep_attention_triton.py): each kernel gets its own, and the gradients stay exact."""
    from ldmfast.ops import attention_triton
    monkeypatch.setattr(attention_triton, "OVERRIDES", {"backward_dkdv": dict(BLOCK_M=16, BLOCK_N=32),
                                                        "backward_dq": dict(BLOCK_M=32, BLOCK_N=16)})
    q = torch.empty(1, 2, 45, 32)
    assert attention_triton._launch("backward_dkdv", q, 70)[:2] == (16, 32)
    assert attention_triton._launch("backward_dq", q, 70)[:2] == (32, 16)
    check_gradients(case, torch.float32, 1, 2, 45, 70, 32)


@pytest.mark.parametrize("case", [c for c in BACKEND_CASES if c.values[0].endswith("triton")])
def test_backward_with_tiles_narrow_along_what_each_kernel_walks(case, monkeypatch):
    """The sweep's candidate for long 16-bit sequences (dk/dv kernel 32 queries x 64 keys, dq
    kernel 64 x 32): gradients over 512 tokens (whole tiles) and 540 keys (a partial last tile)."""
    from ldmfast.ops import attention_triton
    monkeypatch.setattr(attention_triton, "OVERRIDES", {"backward_dkdv": dict(BLOCK_M=32, BLOCK_N=64),
                                                        "backward_dq": dict(BLOCK_M=64, BLOCK_N=32)})
    check_gradients(case, torch.bfloat16, 1, 1, 512, 512, 32)
    check_gradients(case, torch.bfloat16, 1, 1, 512, 540, 32)


class _CountedLaunches:
    """Wraps a Triton kernel: kernel[grid](...) launches it and counts the launch by its PART."""

    def __init__(self, kernel):
        self.kernel, self.parts = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.parts.append(kwargs["PART"])
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("case", [c for c in BACKEND_CASES if c.values[0].endswith("triton")])
@pytest.mark.parametrize("one_launch_max_lq", [0, 256], ids=["two-launches", "one-launch"])
def test_backward_in_one_launch_or_two(case, one_launch_max_lq, monkeypatch):
    """Short query sequences run both backward parts in one launch (its dk/dv programs compute
    delta themselves), longer ones two (the dq part writes delta before the dk/dv part reads it):
    the same exact gradients either way, with partial tiles, Lq != Lk, and each part's own tile
    shapes (which the one launch keeps)."""
    from ldmfast.ops import attention_triton
    monkeypatch.setattr(attention_triton, "ONE_LAUNCH_MAX_LQ", one_launch_max_lq)
    counted = _CountedLaunches(attention_triton._bwd_kernel)
    monkeypatch.setattr(attention_triton, "_bwd_kernel", counted)
    check_gradients(case, torch.float32, 2, 2, 45, 70, 32)
    monkeypatch.setattr(attention_triton, "OVERRIDES", {"backward_dkdv": dict(BLOCK_M=16, BLOCK_N=32),
                                                        "backward_dq": dict(BLOCK_M=32, BLOCK_N=16)})
    check_gradients(case, torch.float32, 1, 2, 33, 20, 16)
    assert counted.parts == (["both"] * 2 if one_launch_max_lq else ["dq", "dkdv"] * 2)


def check_gradients(case, dtype, b, h, lq, lk, d, layout="bhld"):
    device, backend = split_case(case)
    q, k, v = make_qkv(b, h, lq, lk, d, dtype, device, layout)
    dout = torch.randn(b, h, lq, d, dtype=torch.float64).to(device=device, dtype=dtype)
    leaves64 = [t.double().detach().requires_grad_() for t in (q, k, v)]
    ref = torch.softmax(leaves64[0] @ leaves64[1].transpose(-1, -2) * d ** -0.5, -1) @ leaves64[2]
    ref.backward(dout.double())
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with ops.use_backend(backend), ops.poison_outputs():
        ops.attention(*leaves).backward(dout)
    lowp = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    plain_torch(*lowp, d ** -0.5).backward(dout)
    for name, ours, r, torch_lowp in zip("qkv", leaves, leaves64, lowp):
        assert_matches(ours.grad, r.grad, dtype, f"d{name}", torch_lowp=torch_lowp.grad)


@pytest.mark.parametrize("case", BACKEND_CASES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_feature_map_attention(case, memory_format):
    device, backend = split_case(case)
    n, c, hh, ww, heads = 2, 64, 6, 7, 2
    qkv = torch.randn(n, 3 * c, hh, ww, dtype=torch.float64).to(device=device, memory_format=memory_format)
    q, k, v = qkv.float().split(c, dim=1)  # channel slices of one qkv convolution's output
    for t in (q, k, v):
        view = _heads_view(t, heads)
        assert view.data_ptr() == t.data_ptr() and view._base is not None, "heads are views, not copies"
    with ops.use_backend(backend), ops.poison_outputs():
        out = ops.feature_map_attention(q, k, v, heads)
    assert out.shape == (n, c, hh, ww)
    assert out.is_contiguous(memory_format=memory_format), "the output keeps the input's memory format"
    # The reference from explicit copies: tokens as rows, heads split from channels.
    def tokens(t):
        return t.double().reshape(n, heads, c // heads, hh * ww).transpose(2, 3)
    ref, _ = ops.attention_reference(tokens(q), tokens(k), tokens(v), (c // heads) ** -0.5)
    ref = ref.transpose(2, 3).reshape(n, c, hh, ww)
    assert_matches(out, ref, torch.float32)


@pytest.mark.parametrize("case", BACKEND_CASES)
def test_opcheck(case):
    device, backend = split_case(case)
    q, k, v = make_qkv(2, 2, 9, 5, 16, torch.float32, device, seed=0)
    for requires_grad in (False, True):
        args = (q.clone().requires_grad_(requires_grad), k, v, 0.25, backend)
        torch.library.opcheck(torch.ops.ldmfast.attention.default, args)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiles_with_fullgraph(compiler):
    torch._dynamo.reset()
    lin = torch.nn.Linear(32, 96)

    def block(x):
        q, k, v = lin(x).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4)  # (3, B, H, L, D) views
        return ops.attention(q, k, v).transpose(1, 2).flatten(2)

    x = torch.randn(2, 11, 32, requires_grad=True)
    with ops.use_backend("cpu"):
        compiled = torch.compile(block, fullgraph=True, backend=compiler)(x)
        eager = block(x)
        torch.testing.assert_close(compiled, eager)
        compiled.sum().backward()


@pytest.mark.parametrize("change,argument", [
    (dict(k=torch.zeros(3, 2, 5, 8)), "k: batch"),
    (dict(v=torch.zeros(2, 3, 5, 8)), "v: heads"),
    (dict(k=torch.zeros(2, 2, 5, 4)), "k: head dim"),
    (dict(v=torch.zeros(2, 2, 6, 8)), "v: length"),
    (dict(q=torch.zeros(2, 2, 7, 8, dtype=torch.int32)), "q: must be a floating-point"),
    (dict(q=torch.zeros(2, 7, 8)), "q: must have shape"),
    (dict(q=torch.zeros(1, 1, 2, 1024), k=torch.zeros(1, 1, 5, 1024), v=torch.zeros(1, 1, 5, 1024)), "q: head dim"),
    (dict(k=torch.zeros(2, 2, 0, 8), v=torch.zeros(2, 2, 0, 8)), "k: needs at least one key"),
    (dict(v=torch.zeros(2, 2, 5, 8, dtype=torch.float64)), "v: dtype"),
    (dict(scale=float("nan")), "scale"),
    (dict(scale=True), "scale"),
])
def test_bad_input_names_the_argument(change, argument):
    args = dict(q=torch.zeros(2, 2, 7, 8), k=torch.zeros(2, 2, 5, 8), v=torch.zeros(2, 2, 5, 8))
    args.update(change)
    with pytest.raises(ValueError, match=argument):
        ops.attention(**args)


def test_feature_map_attention_rejects_bad_heads():
    x = torch.zeros(1, 6, 2, 2)
    with pytest.raises(ValueError, match="num_heads"):
        ops.feature_map_attention(x, x, x, 4)


@pytest.mark.parametrize("isa", ["base", "avx2"])
@pytest.mark.parametrize("d", [40, 160])  # padded to whole micro-kernel columns on every ISA
def test_cpu_kernel_variants_for_other_cpus(isa, d):
    """The CPU kernel is built per instruction set (baseline, AVX2, AVX-512); the tests above run the
    one this CPU picks, this one caps the choice (LDMFAST_CPU_ISA) in a fresh process."""
    import os
    import subprocess
    import sys
    code = (
        "import torch, ldmfast.ops as ops\n"
        f"d = {d}\n"
        "g = torch.Generator().manual_seed(torch.seed() % 2**31)\n"
        "q, k, v = (torch.randn(2, 3, n, d, dtype=torch.float64, generator=g) for n in (45, 139, 139))\n"
        "ref, _ = ops.attention_reference(q, k, v, d ** -0.5)\n"
        "leaves = [t.float().requires_grad_() for t in (q, k, v)]\n"
        "with ops.use_backend('cpu'):\n"
        "    out = ops.attention(*leaves)\n"
        "dout = torch.randn(out.shape, dtype=torch.float64, generator=g)\n"
        "out.backward(dout.float())\n"
        "r64 = [t.clone().requires_grad_() for t in (q, k, v)]\n"
        "torch.softmax(r64[0] @ r64[1].transpose(-1, -2) * d ** -0.5, -1).matmul(r64[2]).backward(dout)\n"
        "errs = [((out.double() - ref).norm() / ref.norm()).item()]\n"
        "errs += [((a.grad.double() - b.grad).norm() / b.grad.norm()).item() for a, b in zip(leaves, r64)]\n"
        "print(max(errs))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "LDMFAST_CPU_ISA": isa})
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 1e-5


@pytest.mark.cuda
def test_triton_kernels_launch_on_the_tensors_gpu():
    """Triton launches on the current device: the ops make the tensors' GPU current around their
    launches (attention here; GroupNorm and DDIM use the same guard)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    q, k, v = make_qkv(1, 2, 37, 29, 32, torch.float32, "cuda:1")
    ref, _ = ops.attention_reference(q.double(), k.double(), v.double(), 32 ** -0.5)
    with torch.cuda.device(0), ops.use_backend("triton"):
        out = ops.attention(q, k, v)
    assert out.device == q.device
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_triton_device_switches_only_to_another_gpu(monkeypatch):
    """The guard's choice, without GPUs (the end-to-end check above needs two): a CUDA tensor on
    another device than the current one gets that device made current, and nothing otherwise."""
    import contextlib
    import types
    from ldmfast.ops import _native
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    on = lambda device: types.SimpleNamespace(device=torch.device(device))  # noqa: E731
    switch = _native.triton_device(on("cuda:1"))
    assert isinstance(switch, torch.cuda.device) and switch.idx == 1
    for same in ("cuda:0", "cpu"):
        assert isinstance(_native.triton_device(on(same)), contextlib.nullcontext)
