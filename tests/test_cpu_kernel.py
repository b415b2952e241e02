"""`kernel=cpu` (vptq/kernels/cpu.py, csrc/vq_cpu.cpp) against the torch path, and `dense_weights`.

The C++ GEMV and `QuantLinear(q, kernel="torch")` compute the same sum in a different order (the
kernel adds column after column per pass in float32, MKL blocks its GEMV, the norms enter as
W'(s∘x) + b·x instead of inside W), so they agree within a rounding bound, not bitwise. The bound,
per output element, with A = |x| · |W|ᵀ (|W| = |W'|·|s| + |b| with norms) + |bias|:
    float32 activations:  |y - y_ref| <= 2 (in + 4) 2⁻²⁴ · A      (two float32 sums of `in` terms)
    float16 / bfloat16:   + 3 u · A, u = 2⁻¹¹ / 2⁻⁸                 (the reference rounds W and the
                                                                    bias to the dtype, both round y)
A wrong gather changes an element by about one term |x_c w|, ~A / in: far above the bound at these
widths (`test_bound_catches_a_wrong_index` checks it does). `dense_weights` is checked bitwise: it
runs the torch path's own dequantization and `F.linear`.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import pytest
import torch

import vptq.kernels  # noqa: F401  (registers kernel=cpu)
from tests.test_kernels import CASES, make_vq
from vptq.kernels import cpu
from vptq.qlinear import STATS, QuantLinear, dense_weights
from vptq.qweight import QuantizedWeight, Storage

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(cpu.isa() == "unavailable", reason="no C++ compiler: kernel=cpu falls back")]

U = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
DTYPES = list(U)


def abs_weight(q) -> torch.Tensor:
    """|W'|·|s| + |b| (out, in) float64: what bounds the rounding of each product."""
    if getattr(q, "weight_scale", None) is None:
        return q.dequantize(torch.float64).abs()
    bare = dataclasses.replace(q, weight_scale=None, weight_bias=None)
    return bare.dequantize(torch.float64).abs() * q.weight_scale.double().abs() + q.weight_bias.double().abs()


def check_close(y, yr, x, q, bias=None):
    """Assert |y - yr| <= the module docstring's bound, element by element."""
    A = x.double().abs().reshape(-1, q.in_features) @ abs_weight(q).T  # (tokens, out)
    if bias is not None:
        A = A + bias.double().abs()
    tol = (2 * (q.in_features + 4) * 2.0 ** -24 + 3 * U[x.dtype]) * A + 1e-30
    err = (y.double() - yr.double()).abs().reshape(tol.shape)
    assert y.dtype == yr.dtype == x.dtype and y.shape == yr.shape
    assert bool((err <= tol).all()), f"max err/bound {float((err / tol).max()):.3g}"
    return float((err / tol).max())


def run_both(q, x, bias=None):
    lin = QuantLinear(q, bias, kernel="cpu")
    before = cpu.STATS["cpu"]
    with torch.no_grad():
        y = lin(x)
        yr = QuantLinear(q, bias, kernel="torch")(x)
    assert cpu.STATS["cpu"] == before + 1, "kernel=cpu did not run"
    return y, yr


def assert_same_as_tiled(cw, tiled, in_features: int) -> torch.Tensor:
    """cw (a route reading the weight's own indices) gives bitwise the tiled copy's output: 1 to 9 tokens (the
    4/2/1-token programs), one and two threads, AVX2 and scalar (the same products in the same order).
    -> the last x."""
    for T in (1, 2, 3, 4, 9):
        x = torch.randn(T, in_features)
        want = cpu.matmul(tiled, x, nthreads=1)
        assert torch.equal(cpu.matmul(cw, x, nthreads=1), want)
        assert torch.equal(cpu.matmul(cw, x, nthreads=2), want)
        assert torch.equal(cpu.matmul(cw, x, force_scalar=True), cpu.matmul(tiled, x, force_scalar=True))
    return x


# ---------------------------------------------------------------- VPTQ layout: every feature
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 7, 16, 64, 256])
@pytest.mark.parametrize("case", list(CASES))
def test_vq_matches_torch(case, tokens, dtype):
    q = make_vq(**CASES[case])
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, q.in_features, generator=g).to(dtype)
    bias = torch.randn(q.out_features, generator=g)
    y, yr = run_both(q, x, bias)
    check_close(y, yr, x, q, bias)


EXTRA = {  # shapes the shared CASES do not reach: VP = 32, several tiles, many groups, k = 2
    "v24_k5": dict(out=50, inn=24, v=24, k=5, norm=True),
    "v2_k2_tiles": dict(out=130, inn=40, v=2, k=2, groups=4, k_res=3, outliers=4, v_out=3, k_out=7, perm=True),
    "v16_k300": dict(out=35, inn=18, v=16, k=300, groups=3),
}


@pytest.mark.parametrize("case", list(EXTRA))
def test_more_layouts_match_torch(case):
    q = make_vq(**EXTRA[case])
    x = torch.randn(5, q.in_features)
    check_close(*run_both(q, x), x, q)


def test_batched_leading_dims_and_no_bias():
    q = make_vq(**CASES["v6_all"])
    x = torch.randn(2, 3, q.in_features)
    y, yr = run_both(q, x)
    assert y.shape == (2, 3, q.out_features)
    check_close(y, yr, x, q)


@pytest.mark.parametrize("case", ["v6_all", "v3_k32_res4", "v12_k4096_res4096"])
def test_scalar_loop_and_threads(case):
    """The portable loop (CPUs without AVX2) agrees with the torch path too; two threads split tiles,
    each computed as on one thread: bitwise the same output."""
    q = make_vq(**CASES[case])
    x = torch.randn(5, q.in_features)
    cw = cpu.from_layout(vptq.kernels.layout_of(q))
    yr = QuantLinear(q).forward(x).detach()
    check_close(cpu.matmul(cw, x, force_scalar=True), yr, x, q)
    big = make_vq(out=200, inn=40, v=6, k=64, k_res=8)  # 34 vector rows: 5 tiles to split
    cwb = cpu.from_layout(vptq.kernels.layout_of(big))
    xb = torch.randn(3, 40)
    assert torch.equal(cpu.matmul(cwb, xb, nthreads=1), cpu.matmul(cwb, xb, nthreads=2))


def test_bound_catches_a_wrong_index(monkeypatch):
    """One wrong gather (an index off by one in the kernel's own tiled copy: by default the kernel reads
    the weight's indices, which the torch path reads too) breaks the bound."""
    monkeypatch.setattr(cpu, "DIRECT", False)
    q = make_vq(**CASES["v6_k37_pad"])
    x = torch.randn(1, q.in_features)
    lin = QuantLinear(q, kernel="cpu")
    with torch.no_grad():
        lin(x)
        p = lin.kernel_cache["cpu"][2].passes[0]
        step = p.vp * p.codebook.element_size() if p.idx_bytes else 1  # one codeword on
        p.idx[0, 5, 0] = (int(p.idx[0, 5, 0]) + step) % (37 * step)
        y = lin(x)
        yr = QuantLinear(q)(x)
    with pytest.raises(AssertionError, match="max err/bound"):
        check_close(y, yr, x, q)


@pytest.mark.parametrize("case", ["v6_all", "v3_k32_res4", "v12_k4096_res4096", "v8_k65536"])
def test_compact_codebooks_change_nothing(monkeypatch, case):
    """Small codebooks as float32 and indices as byte offsets (`cpu.COMPACT`, in the tiled copy: the
    route with `cpu.DIRECT` off) compute the same products in the same order as float16 codebooks
    indexed by codeword: bitwise the same output, on the AVX2 and on the scalar loop; every combination
    of the two reached (F32_CODEBOOK_BYTES raised: a float32 codebook too large for byte offsets). And
    codebooks of at most 256 entries read through a uint8 tiled copy of codeword numbers (`TILED_U8`, the
    default, which takes the place of byte offsets there): bitwise the same again."""
    monkeypatch.setattr(cpu, "DIRECT", False)
    monkeypatch.setattr(cpu, "TILED_U8", False)
    q = make_vq(**CASES[case])
    x = torch.randn(3, q.in_features)
    lay = vptq.kernels.layout_of(q)
    monkeypatch.setattr(cpu, "COMPACT", False)
    plain = cpu.from_layout(lay)
    assert all(p.codebook.dtype == torch.float16 and not p.idx_bytes for p in plain.passes)
    want, want_scalar = cpu.matmul(plain, x), cpu.matmul(plain, x, force_scalar=True)
    seen = set()
    for f32_bytes in (cpu.F32_CODEBOOK_BYTES, 1 << 30):
        monkeypatch.setattr(cpu, "COMPACT", True)
        monkeypatch.setattr(cpu, "F32_CODEBOOK_BYTES", f32_bytes)
        cw = cpu.from_layout(lay)
        seen |= {(p.codebook.dtype, p.idx_bytes) for p in cw.passes}
        assert torch.equal(cpu.matmul(cw, x), want)
        assert torch.equal(cpu.matmul(cw, x, force_scalar=True), want_scalar)
    expect = {"v6_all": {(torch.float32, True)},  # k <= 64: float32 from the default size on
              "v3_k32_res4": {(torch.float32, True)},
              "v12_k4096_res4096": {(torch.float16, False), (torch.float32, False)},  # 4096 x 32 B > 16 bits
              "v8_k65536": {(torch.float16, False), (torch.float32, False)}}[case]
    assert seen == expect
    monkeypatch.setattr(cpu, "TILED_U8", True)
    monkeypatch.setattr(cpu, "F32_CODEBOOK_BYTES", 16384)
    u8 = cpu.from_layout(lay)
    assert [p.idx.dtype == torch.uint8 for p in u8.passes] == [p.codebook.shape[1] <= 256 for p in u8.passes]
    assert not any(p.idx_bytes for p in u8.passes if p.idx.dtype == torch.uint8)
    assert torch.equal(cpu.matmul(u8, x), want)
    assert torch.equal(cpu.matmul(u8, x, force_scalar=True), want_scalar)


DIRECT_CASES = {  # every index type the weight holds, groups, padding rows, and the halved row programs
    "v6_all": CASES["v6_all"],  # uint8 main, residual and outlier indices, perm, norms, 2 groups
    "v12_k4096_res4096": CASES["v12_k4096_res4096"],  # int16, VP = 16
    "v8_k65536": CASES["v8_k65536"],  # uint16; a 1 MB codebook (> the kernel's BIG_CODEBOOK)
    "v4_k40000_res256_groups": dict(out=44, inn=24, v=4, k=40000, groups=3, k_res=256),  # uint16 + uint8, 3 groups
    "v8_k20000_tiles": dict(out=130, inn=40, v=8, k=20000, groups=2),  # int16, > BIG_CODEBOOK, 3 tiles
}


@pytest.mark.parametrize("l2", [0, 1 << 30], ids=["l2_unknown", "l2_1G"])
@pytest.mark.parametrize("case", list(DIRECT_CASES))
def test_direct_indices_match_the_tiled_copy(monkeypatch, case, l2):
    """The default route reads the weight's own indices in place (`cpu.DIRECT`): no index bytes of its
    own (`nbytes` counts codebooks only, and not a float16 codebook with v == VP, which it reads in place
    too), the same tensor as the VQWeight's; and it computes the same
    products in the same order as the tiled copy did: bitwise the same output, 1 to 9 tokens (the
    4/2/1-token programs, and the one-token programs with half the rows for codebooks that nearly fill
    the L2), one and two threads, AVX2 and scalar."""
    monkeypatch.setattr(cpu, "_L2", [l2])  # a codebook over BIG_CODEBOOK that fits this L2: half rows
    q = make_vq(**DIRECT_CASES[case])
    lay = vptq.kernels.layout_of(q)
    direct = cpu.from_layout(lay)
    assert all(p.direct for p in direct.passes)
    big = case in ("v8_k65536", "v4_k40000_res256_groups", "v8_k20000_tiles")
    assert [p.half_rows for p in direct.passes] == [bool(l2) and big and i == 0 for i in range(len(direct.passes))]
    own = [(q.indices, q.centroids)] + ([(q.res_indices, q.res_centroids)] if q.num_res_centroids else []) + (
        [(q.outlier_indices, q.outlier_centroids)] if q.outlier_size else [])
    assert [p.idx.data_ptr() for p in direct.passes] == [i.data_ptr() for i, _ in own]
    shared = [p.codebook.data_ptr() == c.data_ptr() for p, (_, c) in zip(direct.passes, own)]
    assert shared == [p.shared_codebook for p in direct.passes]
    assert shared[0] == (q.vector_len in cpu.LANES)  # float16, v == VP: the weight's own codebook, not a copy
    assert direct.nbytes() == sum(0 if p.shared_codebook else p.codebook.numel() * p.codebook.element_size()
                                  for p in direct.passes) + sum(
        0 if t is None else t.numel() * t.element_size() for t in (direct.perm, direct.scale, direct.wbias))
    monkeypatch.setattr(cpu, "DIRECT", False)
    tiled = cpu.from_layout(lay)
    assert not any(p.direct for p in tiled.passes)
    x = assert_same_as_tiled(direct, tiled, q.in_features)
    check_close(cpu.matmul(direct, x), QuantLinear(q).forward(x).detach(), x, q)


@pytest.mark.parametrize("case,field,bad", [("v6_k37_pad", "indices", 60), ("v4_k40000_res256_groups", "indices", 50000),
                                            ("v6_all", "outlier_indices", 7)])
def test_out_of_range_index_raises_like_the_torch_path(case, field, bad):
    """An index past its codebook (a malformed file: 37 entries packed in 6 bits) is refused with the
    value and the valid range, on both index routes, where the kernel would read past the codebook."""
    cfg = dict(DIRECT_CASES, **CASES).get(case)
    q = make_vq(**cfg)
    getattr(q, field).view(-1)[3] = bad
    x = torch.randn(1, q.in_features)
    with pytest.raises(IndexError):
        QuantLinear(q)(x)  # the torch path's gather
    for direct in (True, False):
        cpu.DIRECT = direct
        try:
            with torch.no_grad(), pytest.raises(ValueError, match=f"an index {bad} into a .*valid indices are 0.."):
                QuantLinear(q, kernel="cpu")(x)
        finally:
            cpu.DIRECT = True


def test_library_rejects_layouts_it_cannot_read():
    """In place, a transposed pass has one group (AQLM's codes), and split uint16 codes and a second stream
    are transposed-only: the library refuses anything else instead of reading the wrong rows."""
    q = make_vq(**CASES["v6_all"])  # two groups
    cw = cpu.from_layout(vptq.kernels.layout_of(q))
    p = cw.passes[0]
    assert p.direct and p.group_size < p.ncols
    a = make_aqlm(2, 8, 8)
    pa = cpu.from_layout(vptq.kernels.layout_of(a)).passes[0]
    assert pa.split
    for bad in (dataclasses.replace(p, in_mode=True, _args=None), dataclasses.replace(p, split=True, second=pa, _args=None),
                dataclasses.replace(p, second=p, _args=None), dataclasses.replace(pa, in_mode=False, _args=None)):
        with pytest.raises(RuntimeError, match="rejected its arguments"):
            bad.run(cpu.library(), torch.zeros(1, max(q.in_features, a.in_features)), torch.zeros(1, 64), 1)


def test_small_float32_codebook_runs_on_the_kernel():
    """A float32 codebook that float16 cannot hold: the kernel takes it when it is small enough for a
    float32 copy (before: the torch path), and refuses a large one with the reason."""
    q = make_vq(out=24, inn=40, v=8, k=64, k_res=16)
    q.centroids = q.centroids.float() * (1 + 2.0 ** -20)  # off the float16 grid
    q.res_centroids = q.res_centroids.float() / 3
    x = torch.randn(2, q.in_features)
    check_close(*run_both(q, x), x, q)
    big = make_vq(out=16, inn=32, v=8, k=4096)
    big.centroids = big.centroids.float() / 3
    with pytest.raises(cpu.Unsupported, match="not exactly representable in float16"):
        cpu.from_layout(vptq.kernels.layout_of(big))


# ---------------------------------------------------------------- AQLM-style (transposed layout)
def make_aqlm(M, nbits, g, out=20, n=6, seed=0):
    from baselines.aqlm import AQLMWeight

    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** nbits, (out, n, M), generator=gen)
    codebooks = torch.randn(M, 2 ** nbits, g, generator=gen) * 0.1
    return AQLMWeight(codes, codebooks, torch.rand(out, generator=gen) + 0.5, nbits)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("M,nbits,g", [(1, 8, 8), (2, 6, 8), (1, 5, 3), (2, 4, 12), (1, 16, 4)])
def test_aqlm_matches_torch(M, nbits, g, dtype):
    q = make_aqlm(M, nbits, g)
    x = torch.randn(3, q.in_features).to(dtype)
    bias = torch.randn(q.out_features)
    y, yr = run_both(q, x, bias)
    A = x.double().abs() @ q.dequantize(torch.float64).abs().T + bias.double().abs()
    tol = (2 * (q.in_features + 4) * 2.0 ** -24 + 3 * U[dtype]) * A
    assert bool(((y.double() - yr.double()).abs() <= tol).all())


@pytest.mark.parametrize("M,nbits,g", [(2, 8, 8), (2, 4, 12), (2, 8, 3)])
def test_aqlm_two_codebooks_in_one_loop(monkeypatch, M, nbits, g):
    """AQLM's M = 2 runs one loop adding both codewords before the FMA (`cpu.FUSE_IN`): one pass holding
    the second codebook's buffers (counted in nbytes), within the rounding bound of the torch path on
    the AVX2 and the scalar loop, the same on one and two threads, and within the bound of the two-pass
    route it replaced."""
    q = make_aqlm(M, nbits, g, out=37, n=5)
    lay = vptq.kernels.layout_of(q)
    fused = cpu.from_layout(lay)
    assert len(fused.passes) == 1 and fused.passes[0].second is not None
    p = fused.passes[0]
    assert fused.nbytes() == sum((0 if s.direct else s.idx.numel() * s.idx.element_size())
                                 + s.codebook.numel() * s.codebook.element_size() for s in (p, p.second)) + 4 * q.out_features
    monkeypatch.setattr(cpu, "FUSE_IN", False)
    two = cpu.from_layout(lay)
    assert len(two.passes) == 2
    x = torch.randn(5, q.in_features)
    A = x.double().abs() @ q.dequantize(torch.float64).abs().T
    tol = 2 * (q.in_features + 4) * 2.0 ** -24 * A
    ref = QuantLinear(q).forward(x).detach()
    for y in (cpu.matmul(fused, x), cpu.matmul(fused, x, force_scalar=True), cpu.matmul(two, x)):
        assert bool(((y.double() - ref.double()).abs() <= tol).all())
    assert torch.equal(cpu.matmul(fused, x, nthreads=1), cpu.matmul(fused, x, nthreads=2))


AQLM_OWN = {"1x8": (1, 8, 8), "1x16": (1, 16, 8), "2x8": (2, 8, 8), "2x8_g3": (2, 8, 3), "2x16_g4": (2, 16, 4),
            "1x16_g4": (1, 16, 4)}


@pytest.mark.parametrize("case", list(AQLM_OWN))
def test_aqlm_codes_read_in_place(monkeypatch, case):
    """AQLM-style 8-bit codes (and 16-bit ones on request) are read where the weight stores them
    (`KernelLayout.codes`): the
    passes point into `packed_codes` and add no index bytes (2x8: both codes of a vector as one uint16,
    `split`); bitwise the output of the tiled copy (`cpu.DIRECT` off: the same products in the same
    order), 1 to 9 tokens, one and two threads, AVX2 and scalar; within the rounding bound of the torch
    path."""
    M, nbits, g = AQLM_OWN[case]
    monkeypatch.setattr(cpu, "_L2", [1 << 30])  # 16-bit codes' 0.5-1 MB codebooks fit it: half-row programs
    if nbits == 16:  # in place on request (`cpu.DIRECT_IN_DTYPES`): the default keeps a tiled copy of 16-bit codes
        assert not any(p.direct for p in cpu.from_layout(vptq.kernels.layout_of(make_aqlm(M, nbits, g))).passes)
        monkeypatch.setattr(cpu, "DIRECT_IN_DTYPES", (torch.uint8, torch.uint16))
    q = make_aqlm(M, nbits, g, out=37, n=5)
    lay = vptq.kernels.layout_of(q)
    assert lay.codes.data_ptr() == q.packed_codes.data_ptr() and tuple(lay.codes.shape) == (37, 5, M)
    assert torch.equal(lay.codes.to(torch.int64), q.codes())
    own = cpu.from_layout(lay)
    p = own.passes[0]
    assert len(own.passes) == 1 and p.direct and p.idx.data_ptr() == q.packed_codes.data_ptr()
    assert p.half_rows == (nbits == 16)
    assert p.split == (case.startswith("2x8")) and (p.second is not None) == (M == 2)
    assert own.nbytes() == sum(s.codebook.numel() * s.codebook.element_size() * (not s.shared_codebook)
                               for s in [p] + ([p.second] if p.second else [])) + 4 * q.out_features
    monkeypatch.setattr(cpu, "DIRECT", False)
    tiled = cpu.from_layout(lay)
    width = tiled.passes[0].idx.element_size()  # uint8 tiled copies for 256-entry codebooks (`TILED_U8`)
    assert width == (1 if nbits == 8 else 2)
    assert not any(s.direct for s in tiled.passes) and tiled.nbytes() - own.nbytes() == width * 40 * 5 * M  # 5 tiles
    x = assert_same_as_tiled(own, tiled, q.in_features)
    A = x.double().abs() @ q.dequantize(torch.float64).abs().T
    tol = 2 * (q.in_features + 4) * 2.0 ** -24 * A
    assert bool(((cpu.matmul(own, x).double() - QuantLinear(q).forward(x).detach().double()).abs() <= tol).all())


def test_aqlm_other_code_widths_are_copied():
    """Codes of other widths (packed across byte boundaries) have no in-place view: a tiled copy."""
    q = make_aqlm(2, 6, 8)
    lay = vptq.kernels.layout_of(q)
    assert lay.codes is None and q.stored_codes() is None
    assert not any(p.direct for p in cpu.from_layout(lay).passes)


class TransposedVQ(QuantizedWeight):
    """A weight stored as the VPTQ layout of its transpose (how AQLM-style weights reach the kernel), of any
    input width: the last input vector may be partial."""

    def __init__(self, vq):
        self.vq, self.out_features, self.in_features = vq, vq.in_features, vq.out_features

    def dequantize(self, dtype=torch.float32):
        return self.vq.dequantize(dtype).T.contiguous()

    def storage(self):
        return self.vq.storage()

    def to(self, device):
        self.vq.to(device)
        return self

    def kernel_layout(self):
        from vptq.qweight import KernelLayout
        return KernelLayout(self.vq, transposed=True)


@pytest.mark.parametrize("v,inn", [(3, 22), (3, 24), (8, 22), (6, 30)])
def test_transposed_vectors_shorter_than_lanes_and_partial(v, inn):
    """x is read as it is, g floats per input vector (masked loads where g < the codeword's lanes), and
    zero-padded only where in_features is not a multiple of g: within the rounding bound of the torch
    path, 1 to 9 tokens, AVX2 and scalar."""
    q = TransposedVQ(make_vq(out=inn, inn=13, v=v, k=37))
    cw = cpu.from_layout(vptq.kernels.layout_of(q))
    assert cw.transposed and cw.g == v and cw.passes[0].vp == cpu.lanes(v)
    for T in (1, 2, 3, 4, 9):
        x = torch.randn(T, inn)
        y, yr = run_both(q, x)
        check_close(y, yr, x, q)
        check_close(cpu.matmul(cw, x, force_scalar=True), yr, x, q)


AQLM_MANY = {"3x11_g16": (3, 11, 16), "7x7_g16": (7, 7, 16), "4x8_g8": (4, 8, 8), "3x8_g8": (3, 8, 8),
             "5x8_g3": (5, 8, 3), "8x8_g4": (8, 8, 4), "3x16_g4": (3, 16, 4)}


@pytest.mark.parametrize("case", list(AQLM_MANY))
def test_aqlm_more_codebooks(monkeypatch, case):
    """M > 2 codebooks (what `method=aqlm` chooses at 2 and 3 bits on 7B-70B shapes: 3x11/g16, 7x7/g16):
    codebooks 2.. reach the kernel as the layout's `extra` ones, two per pass, ceil(M / 2) passes; 8-bit
    codes in place (both codes of a pair in one uint16 load where M is even); within the rounding bound
    of the torch path, where each pass sums its own codewords (so the bound takes Σ_m |C_m|, not
    |Σ_m C_m|), AVX2 and scalar, 1 to 9 tokens; bitwise the tiled copy's output (uint8 for codebooks of at
    most 256 entries, or uint16). kernel=triton refuses
    the layout (it sums at most 2)."""
    M, nbits, g = AQLM_MANY[case]
    q = make_aqlm(M, nbits, g, out=37, n=5)
    lay = vptq.kernels.layout_of(q)
    assert len(lay.extra) == M - 2
    with pytest.raises(vptq.kernels.Unsupported, match="kernel=triton sums at most 2"):
        vptq.kernels.from_layout(lay)
    cw = cpu.from_layout(lay)
    assert [p.second is not None for p in cw.passes] == [True] * (M // 2) + [False] * (M % 2)  # ceil(M / 2) passes
    in_place = nbits == 8
    assert all(p.direct == in_place for p in cw.passes)
    assert all(p.split == (in_place and M % 2 == 0) for p in cw.passes)
    if in_place:
        assert all(p.idx.data_ptr() == q.packed_codes.data_ptr() for p in cw.passes)
    monkeypatch.setattr(cpu, "DIRECT", False)
    tiled = cpu.from_layout(lay)
    assert [p.idx.dtype for p in tiled.passes] == [torch.uint8 if nbits <= 8 else torch.uint16] * len(tiled.passes)
    monkeypatch.setattr(cpu, "TILED_U8", False)
    tiled16 = cpu.from_layout(lay)  # uint16 codeword numbers or byte offsets: the same products
    C, codes = q.codebooks.double().abs(), q.codes()
    W_abs = sum(C[m][codes[..., m]] for m in range(M)).reshape(q.out_features, -1) * q.scales.double().abs()[:, None]
    for T in (1, 2, 3, 4, 9):
        x = torch.randn(T, q.in_features)
        y, yr = run_both(q, x)
        tol = 2 * (q.in_features + M + 4) * 2.0 ** -24 * (x.double().abs() @ W_abs.T)
        for out in (y, cpu.matmul(cw, x, force_scalar=True)):
            assert bool(((out.double() - yr.double()).abs() <= tol).all())
        assert torch.equal(cpu.matmul(cw, x, nthreads=1), cpu.matmul(tiled, x, nthreads=1))
        assert torch.equal(cpu.matmul(tiled16, x, nthreads=1), cpu.matmul(tiled, x, nthreads=1))
        assert torch.equal(cpu.matmul(cw, x, nthreads=2), cpu.matmul(cw, x, nthreads=1))


def test_extra_codebooks_on_an_out_layout_are_refused():
    """`extra` codebooks belong to transposed layouts: an OUT layout carrying them is refused, not read
    without them."""
    from vptq.qweight import KernelLayout
    q = make_vq(**CASES["v6_k37_pad"])
    lay = KernelLayout(q, extra=((q.centroids, q.indices),))
    with pytest.raises(vptq.kernels.Unsupported, match="extra codebooks"):
        cpu.from_layout(lay)


# ---------------------------------------------------------------- what it does not take
class ScalarWeight(QuantizedWeight):
    """A weight type without a kernel layout (like GPTVQ or a scalar grid)."""

    def __init__(self, W):
        self.W, self.out_features, self.in_features = W, *W.shape

    def dequantize(self, dtype=torch.float32):
        return self.W.to(dtype)

    def storage(self):
        return Storage(self.W.numel(), {"codes": self.W.numel() * 16})

    def to(self, device):
        self.W = self.W.to(device)
        return self


def test_fallbacks_to_torch():
    q = make_vq(**CASES["v6_all"])
    lin = QuantLinear(q, kernel="cpu")
    x = torch.randn(cpu.MAX_TOKENS + 1, q.in_features)
    assert cpu.cpu_linear(lin, x) is None  # prefill
    assert cpu.cpu_linear(lin, x[:0]) is None  # no tokens
    assert cpu.cpu_linear(lin, x[:1, :-1]) is None  # wrong width: the torch path raises its own error
    assert cpu.cpu_linear(lin, x[:1].double()) is None  # dtype
    assert cpu.cpu_linear(lin, x[:1].requires_grad_()) is None  # autograd
    with torch.no_grad():
        assert cpu.cpu_linear(lin, x[:1]) is not None
    other = QuantLinear(ScalarWeight(torch.randn(4, 8)), kernel="cpu")
    assert cpu.cpu_linear(other, torch.randn(1, 8)) is None
    x1 = torch.randn(1, 8)
    assert torch.equal(other(x1), torch.nn.functional.linear(x1, other.qweight.W))
    big_k = make_vq(out=8, inn=4, v=1, k=70000)
    assert cpu.cpu_linear(QuantLinear(big_k, kernel="cpu"), torch.randn(1, 4)) is None  # > uint16


def test_cached_buffers_follow_the_weight():
    q = make_vq(**CASES["v4_res_groups"])
    lin = QuantLinear(q, kernel="cpu")
    x = torch.randn(2, q.in_features)
    with torch.no_grad():
        lin(x)
        q.res_centroids.mul_(-3)  # stepped in place (finetuning)
        check_close(lin(x), QuantLinear(q)(x), x, q)
        q.centroids = q.centroids * 0.5  # replaced
        check_close(lin(x), QuantLinear(q)(x), x, q)


def test_no_compiler_falls_back_with_one_warning(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(cpu, "_LIB", [])
    monkeypatch.setattr(cpu, "compiler", lambda: None)
    q = make_vq(**CASES["v6_k37_pad"])
    lin = QuantLinear(q, kernel="cpu")
    x = torch.randn(1, q.in_features)
    with caplog.at_level(logging.WARNING, logger="vq-bench"):
        assert torch.equal(lin(x), QuantLinear(q)(x))
        lin(x)
    warnings = [r for r in caplog.records if "kernel=cpu" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0].getMessage()
    assert cpu.isa() == "unavailable"


def test_build_is_cached_by_source_and_flags(monkeypatch, tmp_path):
    """A fresh cache folder gets one library; a second build reuses it without compiling; other
    flags (or another source, compiler, machine) have another file."""
    monkeypatch.setenv("VQB_CACHE", str(tmp_path))
    cxx = cpu.compiler()
    path = cpu._build(cxx, cpu.FLAGS)
    assert os.path.dirname(path) == str(tmp_path / "cpu_kernels") and os.path.isfile(path)
    mtime = os.stat(path).st_mtime_ns
    assert cpu._build(cxx, cpu.FLAGS) == path and os.stat(path).st_mtime_ns == mtime
    assert cpu.library_path(cxx, cpu.FLAGS + cpu.OPENMP) != path
    assert os.listdir(tmp_path / "cpu_kernels") == [os.path.basename(path)]  # no temporary left


# ---------------------------------------------------------------- a model
def test_tiny_model_decodes_through_the_kernel():
    """A tiny Llama of QuantLinear(VQWeight) layers (residual, outliers, perm, norms): 8 tokens through
    kernel=cpu give the logits of kernel=torch (float rounding apart)."""
    from tests.test_throughput import set_kernel, tiny_vq_model

    model, _ = tiny_vq_model()
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        set_kernel(model, "torch")
        ref = model(ids, use_cache=False).logits
        set_kernel(model, "cpu")
        before = cpu.STATS["cpu"]
        got = model(ids, use_cache=False).logits
        set_kernel(model, "torch")
    assert cpu.STATS["cpu"] - before == 14  # every linear of both blocks
    assert float((got - ref).norm() / ref.norm()) < 1e-5


def test_resident_bytes_count_what_the_kernel_adds(monkeypatch):
    """`runners.throughput.resident_bytes` (metrics.json kernel.resident_bytes): the model's own tensors,
    each storage once, and what kernel=cpu adds after a decode step. Reading the weight's indices in
    place adds exactly the tiled copies' bytes less than the old route (`cpu.DIRECT` off)."""
    from runners.throughput import resident_bytes
    from tests.test_throughput import set_kernel, tiny_vq_model

    model, _ = tiny_vq_model()
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    own = {id(t): t for m in model.modules() for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))}
    own.update({id(t): t for m in layers for t in vars(m.qweight).values() if isinstance(t, torch.Tensor)})
    by_hand = sum(t.numel() * t.element_size() for t in own.values())
    ids = torch.randint(0, model.config.vocab_size, (1, 1), generator=torch.Generator().manual_seed(0))

    def after_one_token():
        for m in layers:
            m.kernel_cache.clear()
        set_kernel(model, "cpu")
        try:
            with torch.no_grad():
                model(ids, use_cache=False)
        finally:
            set_kernel(model, "torch")
        return resident_bytes(model)

    try:
        for m in layers:
            m.kernel_cache.clear()
        assert resident_bytes(model) == {"model_bytes": by_hand, "kernel_buffer_bytes": 0}
        direct = after_one_token()
        passes = [p for m in layers for p in m.kernel_cache["cpu"][2].passes]
        assert all(p.direct for p in passes) and direct["model_bytes"] == by_hand
        monkeypatch.setattr(cpu, "DIRECT", False)
        tiled = after_one_token()
        copies = sum(p.idx.numel() * p.idx.element_size() for m in layers for p in m.kernel_cache["cpu"][2].passes)
        assert copies > 0 and tiled["kernel_buffer_bytes"] - direct["kernel_buffer_bytes"] == copies
    finally:
        for m in layers:
            m.kernel_cache.clear()


def test_dense_weights_one_dequantization_per_layer_same_perplexity():
    """Inside dense_weights each QuantLinear dequantizes once for the whole evaluation (outside: on
    every forward) and the perplexity is bitwise the same; the dense weights are freed on exit."""
    from runners.ppl import perplexity
    from tests.test_throughput import set_kernel, tiny_vq_model

    model, _ = tiny_vq_model()
    set_kernel(model, "torch")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    windows = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))
    d0 = STATS["dequantize"]
    outside = perplexity(model, windows, "cpu")
    d1 = STATS["dequantize"]
    with dense_weights(model) as n:
        inside = perplexity(model, windows, "cpu")
        d2 = STATS["dequantize"]
        again = perplexity(model, windows, "cpu")
        assert STATS["dequantize"] == d2
        assert all(m._dense for m in layers)
    assert n == len(layers) == 14
    assert d1 - d0 == 3 * len(layers)  # per window, per layer
    assert d2 - d1 == len(layers)  # once per layer
    assert inside == outside == again
    assert all(m._dense is None for m in layers)


def test_dense_weights_filters_and_nesting():
    q = make_vq(**CASES["v6_k37_pad"])
    model = torch.nn.Sequential(QuantLinear(q, kernel="torch"), torch.nn.ReLU(), QuantLinear(
        make_vq(out=48, inn=20, v=4, k=16), kernel="triton"))
    x = torch.randn(2, q.in_features)
    with torch.no_grad():
        with dense_weights(model, kernels=("torch", "cpu")) as n:
            assert n == 1 and model[0]._dense is not None and model[2]._dense is None
            with dense_weights(model) as inner:  # covers only what the outer one does not
                assert inner == 1
            assert model[0]._dense is not None and model[2]._dense is None
            model(x)
        with dense_weights(model, enabled=False) as off:
            assert off == 0 and model[0]._dense is None


def test_decode_benchmark_smoke(capsys):
    """benchmarks/cpu_decode_bench.py runs (tiny shapes, with the --plain and --tiled routes) and ends
    with its contract line."""
    import re

    from benchmarks import cpu_decode_bench

    cpu_decode_bench.main(["--shapes", "tiny", "--formats", "2b-v6k4096,3b-v8k65536r256,2b-aqlm2x8", "--batches",
                           "1,4", "--threads", "1", "--reps", "1", "--inner", "1", "--tiled", "--plain"])
    out = capsys.readouterr().out.strip().splitlines()
    names = ("| 2b-v6k4096", "| 3b-v8k65536r256", "| 2b-aqlm2x8")
    rows = [line for line in out if any(n in line for n in names)]
    assert len(rows) == 3 * 2 * 2 and all(len(r.split("|")) == 15 for r in rows)  # + plain, tiled: ms and ratio
    assert cpu.COMPACT is True and cpu.DIRECT is True  # the switches are restored
    assert re.fullmatch(r"min speedup vs fp32 at batch 1: \d+\.\d\d", out[-1]), out[-1]


def test_block_benchmark_smoke(capsys):
    """benchmarks/cpu_block_bench.py runs (a tiny block): the kernel ran, the quantized block's hidden
    states matched the float block's (it exits otherwise), and the contract line ends the output."""
    import re

    from benchmarks import cpu_block_bench

    before = cpu.STATS["cpu"]
    cpu_block_bench.main(["--config", "tiny", "--formats", "2b-v6k4096,3b-v8k65536r256", "--threads", "1",
                          "--prompt", "5", "--steps", "2", "--reps", "1", "--torch"])
    out = capsys.readouterr().out.strip().splitlines()
    assert cpu.STATS["cpu"] > before
    rows = [line for line in out if line.startswith("| 2b-v6k4096") or line.startswith("| 3b-v8k65536r256")]
    assert len(rows) == 2 and all(float(r.split("|")[7]) <= 1e-3 for r in rows)  # rel err column
    assert re.fullmatch(r"min speedup vs fp32 per token \(one block, batch 1\): \d+\.\d\d", out[-1]), out[-1]


def test_throughput_reports_the_cpu_route():
    """metrics.json's per-layer `path` names the route that ran: "cpu" where the C++ kernel takes the
    call, "torch" where it falls back (too many tokens, kernel=torch)."""
    from runners.throughput import _route

    q = make_vq(**CASES["v6_all"])
    lin = QuantLinear(q, kernel="cpu")
    assert _route(lin, torch.randn(1, q.in_features)) == "cpu"
    assert _route(lin, torch.randn(cpu.MAX_TOKENS + 1, q.in_features)) == "torch"
    assert _route(QuantLinear(q, kernel="torch"), torch.randn(1, q.in_features)) == "torch"


def test_aqlm_reference_benchmark_says_what_it_needs(monkeypatch):
    """benchmarks/aqlm_cpu_bench.py needs AQLM's own package (not a dependency of this project): without
    it, one clear line that says so, before any timing."""
    import sys

    from benchmarks import aqlm_cpu_bench

    monkeypatch.setitem(sys.modules, "aqlm", None)  # `import aqlm` raises ImportError
    monkeypatch.setenv("NUMBA_NUM_THREADS", "1")  # the script sets it; restored after the test
    with pytest.raises(SystemExit, match="needs the aqlm package and numba"):
        aqlm_cpu_bench.main(["--shapes", "tiny", "--reps", "1"])


def test_model_benchmark_smoke(tmp_path, capsys):
    """benchmarks/cpu_model_bench.py runs on an exported tiny model (float, in-place and tiled routes),
    reports that the tiled route's kernel holds more memory than the in-place one, and ends with its
    contract line."""
    import re

    from transformers import AutoConfig, AutoModelForCausalLM

    from benchmarks import cpu_model_bench
    from tests.test_format import vq_tiny_llama
    from vptq.format import export_vptq

    model, tok = vq_tiny_llama(seed=1)
    folder = export_vptq(model, tok, str(tmp_path / "q"))
    conf = AutoConfig.from_pretrained(folder)
    del conf.quantization_config
    AutoModelForCausalLM.from_config(conf).save_pretrained(str(tmp_path / "f"))  # safetensors
    before = cpu.STATS["cpu"]
    cpu_model_bench.main(["--model", folder, "--float", str(tmp_path / "f"), "--tiled", "--tokens", "2", "--reps",
                          "1", "--threads", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert cpu.STATS["cpu"] > before
    rows = {line.split("|")[1].strip(): line.split("|") for line in out if re.match(r"\| (float|cpu|tiled) ", line)}
    assert set(rows) == {"float", "cpu", "tiled"}
    assert float(rows["tiled"][6]) > float(rows["cpu"][6])  # kernel MB: the tiled copies
    assert re.fullmatch(r"cpu decode speedup vs float: \d+\.\d\d", out[-1]), out[-1]


@pytest.mark.parametrize("entries,want", [([("1", "Data", "32K"), ("2", "Unified", "1024K")], 1 << 20),
                                          ([("2", "Unified", "2M")], 2 << 20), ([("1", "Data", "48K")], 0), ([], 0)])
def test_l2_bytes_from_sysfs(tmp_path, monkeypatch, entries, want):
    """The L2 size that picks half-row programs comes from sysfs (K / M suffixes); 0 where it is absent."""
    for i, (level, kind, size) in enumerate(entries):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(level + "\n")
        (d / "type").write_text(kind + "\n")
        (d / "size").write_text(size + "\n")
    monkeypatch.setattr(cpu, "CACHE_SYSFS", str(tmp_path))
    monkeypatch.setattr(cpu, "_L2", [])
    assert cpu.l2_bytes() == want
