"""Triton kernels (`vptq/kernels/`) against their torch references.

Dequantization must be EXACT vs `VQWeight.dequantize` (fp32, fp16, bf16 outputs); the fused
GEMV must be close to an fp64 product with the exact weight (fp32 / fp16 / bf16 activations).
Cases cover non-power-of-two v, non-power-of-two k, indices straddling int32 words, residual
codebooks, groups, outlier columns, permutation, norm, padding rows, both output modes of the
GEMV (direct store and split columns with atomics) and both inner products (batch 1 and tl.dot).

Where CUDA is present the cases run compiled on the GPU. Elsewhere they run through Triton's
interpreter in ONE child process (TRITON_INTERPRET=1 must be set before triton is imported and
must not leak into other test modules), on tiny shapes (~1.5 ms per program instance).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from vptq.kernels.layout import (pack_planes, pack_stream, plane_row_bytes, plane_widths, unpack_planes,
                                 unpack_stream)
from vptq.vqweight import VQWeight

ON_GPU = torch.cuda.is_available()
CHILD = os.environ.get("TRITON_INTERPRET") == "1" or ON_GPU
DEVICE = "cuda" if ON_GPU else "cpu"


def make_vq(out=20, inn=48, v=6, k=37, groups=1, k_res=0, outliers=0, v_out=4, k_out=5, perm=False,
            norm=False, seed=0) -> VQWeight:
    """A random VQWeight (codebooks ~N(0,1) in float16) in the official layout."""
    g = torch.Generator().manual_seed(seed)
    gs = (inn - outliers) // groups
    n = -(-out // v)
    kw = dict(out_features=out, in_features=inn, vector_len=v, num_centroids=k, group_num=groups, group_size=gs,
              centroids=torch.randn(groups, k, v, generator=g).half(),
              indices=torch.randint(0, k, (groups, n, gs), generator=g))
    if k_res:
        kw.update(num_res_centroids=k_res, res_centroids=(0.3 * torch.randn(groups, k_res, v, generator=g)).half(),
                  res_indices=torch.randint(0, k_res, (groups, n, gs), generator=g))
    if outliers:
        no = -(-out // v_out)
        kw.update(outlier_size=outliers, outlier_vector_len=v_out, outlier_num_centroids=k_out,
                  outlier_centroids=(3 * torch.randn(1, k_out, v_out, generator=g)).half(),
                  outlier_indices=torch.randint(0, k_out, (1, no, outliers), generator=g))
    if perm:
        kw["perm"] = torch.randperm(inn, generator=g)
    if norm:
        kw["weight_scale"] = (0.5 + torch.rand(inn, generator=g)).half()
        kw["weight_bias"] = (0.1 * torch.randn(inn, generator=g)).half()
    return VQWeight(**kw).to(DEVICE)


# name -> make_vq kwargs: every feature of the format, tiny shapes
CASES = {
    "v6_k37_pad": dict(out=20, inn=48, v=6, k=37),  # non-pow2 v and k, 12-bit straddling, padding rows
    "v4_res_groups": dict(out=16, inn=64, v=4, k=16, groups=2, k_res=8),  # 4+3 bit merged, groups
    "v6_all": dict(out=22, inn=56, v=6, k=64, groups=2, k_res=16, outliers=8, perm=True, norm=True),
    "v8_k65536": dict(out=16, inn=32, v=8, k=65536),  # 16-bit, word aligned
    "v3_k32_res4": dict(out=9, inn=40, v=3, k=32, k_res=4, perm=True),  # 7-bit straddling, VP=4
    "v12_k4096_res4096": dict(out=24, inn=32, v=12, k=4096, k_res=4096, norm=True),  # 24 bits, VP=16
    "v1_k16": dict(out=16, inn=32, v=1, k=16, outliers=4, v_out=2, k_out=3),  # scalar codebook
    "v4_gs21": dict(out=8, inn=21, v=4, k=16),  # odd group size: no bit-plane step fits, packed kernel
}
TOL = {torch.float32: 2e-3 if ON_GPU else 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# ---------------------------------------------------------------- packing (plain torch, any process)
@pytest.mark.parametrize("gs,ib,rb", [(48, 12, 0), (40, 5, 2), (32, 16, 0), (32, 12, 12), (7, 3, 0), (64, 16, 16)])
def test_pack_stream_roundtrip_and_official_layout(gs, ib, rb):
    g = torch.Generator().manual_seed(gs * 100 + ib)
    idx = torch.randint(0, 2 ** ib, (2, 3, gs), generator=g)
    res = torch.randint(0, 2 ** rb, (2, 3, gs), generator=g) if rb else None
    packed = pack_stream(idx, ib, res, rb)  # (2, 3, W)
    assert packed.dtype == torch.int32 and packed.shape[-1] == -(-gs * (ib + rb) // 32)
    i2, r2 = unpack_stream(packed, ib, gs, rb)
    assert torch.equal(i2, idx) and (r2 is None if not rb else torch.equal(r2, res))
    try:  # the format owner's packer, where it exists and the official unpacker accepts the widths
        from vptq.pack import check_packable, pack_indices
        check_packable(gs, ib, rb)
    except (ImportError, ValueError):
        return
    assert torch.equal(pack_indices(idx, ib, res, rb), packed)


def test_pack_stream_bit_positions():
    # element j's bits start at stream bit 12*j, little-endian across int32 words
    idx = torch.tensor([[0xABC, 0x123, 0xFFF]])
    w = pack_stream(idx, 12).to(torch.int64) & 0xFFFFFFFF  # (1, 2)
    stream = int(w[0, 0]) | (int(w[0, 1]) << 32)
    assert stream == 0xABC | (0x123 << 12) | (0xFFF << 24)


@pytest.mark.parametrize("t", list(range(1, 33)))
def test_pack_planes_roundtrip(t):
    g = torch.Generator().manual_seed(t)
    for gs in (1, 7, 40, 129):
        m = torch.randint(0, 2 ** t, (2, 3, gs), generator=g, dtype=torch.int64)
        p = pack_planes(m, t)
        assert p.dtype == torch.uint8 and p.shape == (6, sum(plane_row_bytes(w, gs) for w in plane_widths(t)))
        assert p.shape[1] % 16 == 0
        assert torch.equal(unpack_planes(p, t, gs), m.reshape(6, gs))


def test_pack_planes_bit_positions():
    """t = 12: an 8-bit plane (low bits, one byte per entry) then a 4-bit plane (two entries per
    byte, entry j at bit 4 * (j % 2) of byte j // 2), each row padded to 16 bytes."""
    m = torch.tensor([[0xABC, 0x123, 0xF0F]])
    p = pack_planes(m, 12)
    assert p.shape == (1, 32)
    assert p[0, :3].tolist() == [0xBC, 0x23, 0x0F] and p[0, 3:16].eq(0).all()
    assert p[0, 16:18].tolist() == [0xA | (0x1 << 4), 0xF] and p[0, 18:].eq(0).all()
    assert plane_widths(12) == [8, 4] and plane_widths(31) == [16, 8, 4, 2, 1]


def test_segment_planes_match_packed_stream():
    from vptq.kernels.layout import from_vqweight

    q = make_vq(**CASES["v4_res_groups"])
    seg = from_vqweight(q.to("cpu")).main
    idx, res = unpack_stream(seg.packed, seg.index_bits, seg.group_size, seg.res_bits)
    merged = (idx | (res << seg.index_bits)).reshape(-1, seg.group_size)
    assert torch.equal(unpack_planes(seg.planes, seg.total_bits, seg.group_size), merged)


def test_gemv_candidates_include_the_plane_kernel():
    """The tuner times the bit-plane kernel beside the packed one (1-4 tokens), with a step that
    divides the group size; never on the tl.dot path, nor where no step fits (odd group size)."""
    from vptq.kernels.dispatch import config_label, gemv_candidates
    from vptq.kernels.gemv import plan
    from vptq.kernels.layout import from_vqweight

    kw = from_vqweight(make_vq(out=64, inn=96, v=6, k=4096).to("cpu"))  # gs 96: C 64 -> 32
    one = gemv_candidates(kw, 1, sm_count=132)
    planes = [c for c in one if c.get("PLANES")]
    assert planes and len(planes) < len(one)
    assert all(96 % c["BLOCK_C"] == 0 and plan(kw.main, c, 1).planes for c in planes)
    labels = [config_label(c) for c in one]
    assert len(set(labels)) == len(labels) and all(lb.endswith(" planes") for lb in map(config_label, planes))
    assert any(c.get("PLANES") for c in gemv_candidates(kw, 4, sm_count=132))  # elementwise, 2-4 tokens
    assert not any(c.get("PLANES") for T in (5, 16) for c in gemv_candidates(kw, T, sm_count=132))  # tl.dot
    odd = from_vqweight(make_vq(**CASES["v4_gs21"]).to("cpu"))
    assert not any(c.get("PLANES") for c in gemv_candidates(odd, 1, sm_count=132))


# ---------------------------------------------------------------- kernels (GPU or interpreter child)
if not CHILD:
    def test_kernels_under_interpreter():
        """Runs this file's kernel cases in one child process with TRITON_INTERPRET=1."""
        env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_DEFAULT_FP_FUSION": "0"}
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)],
                           env=env, capture_output=True, text=True, timeout=900,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-3000:]
        assert " passed" in r.stdout, r.stdout[-2000:]

    def test_cpu_without_interpreter_falls_back_to_torch():
        import vptq.kernels  # noqa: F401  (registers "triton"; compiled kernels cannot run on CPU)
        from vptq.kernels import dispatch
        from vptq.qlinear import QuantLinear

        q = make_vq(**CASES["v6_all"])
        lin_t, lin_r = QuantLinear(q, kernel="triton"), QuantLinear(q, kernel="torch")
        x = torch.randn(3, q.in_features)
        before = dispatch.STATS["torch"]
        assert torch.equal(lin_t(x), lin_r(x))
        assert dispatch.STATS["torch"] == before + 1

else:
    from vptq.kernels import dispatch
    from vptq.kernels.dequant import dequantize, dequantize_reference
    from vptq.kernels.gemv import gemv, gemv_reference, plan

    # small blocks: several row blocks, several column steps per program, split columns (atomics)
    SMALL_DEQUANT = {"BLOCK_R": 2, "BLOCK_C": 16, "num_warps": 1}
    SMALL_SPLIT = {"BLOCK_R": 4, "BLOCK_C": 16, "SPLIT": 2, "num_warps": 1, "num_stages": 1, "DOT": False}
    SMALL_DIRECT = {**SMALL_SPLIT, "SPLIT": 1}
    SMALL_DOT = {**SMALL_SPLIT, "DOT": True}  # tl.dot inner product (2+ tokens)
    SMALL_PLANES = {**SMALL_DIRECT, "PLANES": True}  # 1-4 tokens from the bit planes
    SMALL_PLANES_SPLIT = {**SMALL_SPLIT, "BLOCK_C": 8, "SPLIT": 3, "PLANES": True}
    from vptq.kernels.layout import from_vqweight
    from vptq.qlinear import QuantLinear

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
    @pytest.mark.parametrize("case", list(CASES))
    def test_dequantize_exact(case, dtype):
        q = make_vq(**CASES[case])
        kw = from_vqweight(q)
        ref = q.dequantize(dtype)
        assert torch.equal(dequantize_reference(kw, dtype), ref)  # the packed-stream oracle
        for cfg in (None, SMALL_DEQUANT):  # the default blocks, and many small programs
            W = dequantize(kw, dtype, cfg)
            assert W.dtype == dtype and W.shape == ref.shape
            assert torch.equal(W, ref), f"{cfg}: max |diff| {float((W.float() - ref.float()).abs().max())}"

    # 1 and 3 tokens: elementwise path (one accumulator per token); 5 and 16 (the largest decode
    # batch): tl.dot path, float16 only (keeps the interpreter run short)
    GEMV_PARAMS = [pytest.param(c, d, t, id=f"{c}-{str(d)[6:]}-{t}") for c in CASES
                   for d in (torch.float32, torch.float16, torch.bfloat16) for t in (1, 3, 5, 16)
                   if t <= 3 or d == torch.float16]

    @pytest.mark.parametrize("case,dtype,tokens", GEMV_PARAMS)
    def test_gemv_matches_reference(case, dtype, tokens):
        q = make_vq(**CASES[case], seed=tokens)
        kw = from_vqweight(q)
        g = torch.Generator().manual_seed(tokens)
        x = torch.randn(tokens, q.in_features, generator=g).to(DEVICE, dtype)
        bias = torch.randn(q.out_features, generator=g).to(DEVICE, dtype)
        y64 = x.double() @ q.dequantize(torch.float32).double().T + bias.double()  # exact weight
        # default (interpreter: split columns + atomics), small blocks with a direct store; in
        # float16 also small blocks with split columns, and tl.dot for a few tokens
        cfgs = [None, SMALL_DIRECT] + ([SMALL_SPLIT] if dtype == torch.float16 else [])
        cfgs += [SMALL_DOT] if dtype == torch.float16 and 1 < tokens <= 4 else []
        cfgs += [SMALL_PLANES, SMALL_PLANES_SPLIT] if tokens <= 4 else []
        for cfg in cfgs:
            y = gemv(kw, x, bias, cfg)
            assert y.dtype == dtype and y.shape == (tokens, q.out_features)
            assert torch.isfinite(y).all()
            assert rel(y, y64) < TOL[dtype], f"{cfg}: rel err {rel(y, y64):.2e}"
        assert rel(gemv_reference(kw, x, bias), y64) < TOL[dtype]
        if tokens <= 4:  # the bit-plane kernel ran wherever a step fits the group size
            assert plan(kw.main, SMALL_PLANES, tokens).planes == (case != "v4_gs21")

    @pytest.mark.parametrize("tokens", [1, 3])
    def test_every_candidate_matches(tokens):
        """Every configuration the tuner may pick for 1 and 3 tokens (packed and bit-plane kernels,
        tl.dot, column splits) gives the product, on a weight with a residual codebook and a norm."""
        from vptq.kernels.dispatch import config_label, gemv_candidates

        q = make_vq(out=40, inn=512, v=4, k=64, k_res=8, norm=True, seed=3)
        kw = from_vqweight(q)
        x = torch.randn(tokens, q.in_features, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.float16)
        y64 = x.double() @ q.dequantize(torch.float32).double().T
        cands = gemv_candidates(kw, tokens, sm_count=4)
        assert any(c.get("PLANES") for c in cands) and any(c["SPLIT"] > 1 for c in cands)
        for cfg in cands:
            assert rel(gemv(kw, x, None, cfg), y64) < TOL[torch.float16], config_label(cfg)

    @pytest.mark.parametrize("tokens", [1, 4, 24])
    def test_quantlinear_triton_routes_equal_torch(tokens):
        q = make_vq(**CASES["v6_all"])
        bias = torch.randn(q.out_features)
        lin_t = QuantLinear(q, bias, kernel="triton").to(DEVICE)
        lin_r = QuantLinear(q, bias, kernel="torch").to(DEVICE)
        x = torch.randn(2, tokens, q.in_features).to(DEVICE, torch.float16)  # (batch, seq, in)
        route = dispatch.choose(2 * tokens).name
        before = dispatch.STATS[route]
        y = lin_t(x)
        assert dispatch.STATS[route] == before + 1, "the Triton route did not run"
        yr = lin_r(x)
        assert y.shape == yr.shape == (2, tokens, q.out_features)
        assert rel(y, yr) < 3e-3

    def make_aqlm(M, nbits, g=4, out=12, inn=32, seed=0):
        from baselines.aqlm import AQLMWeight

        gen = torch.Generator().manual_seed(seed)
        codes = torch.randint(0, 2**nbits, (out, inn // g, M), generator=gen)
        codebooks = torch.randn(M, 2**nbits, g, generator=gen) * 0.1
        return AQLMWeight(codes, codebooks, torch.rand(out, generator=gen) + 0.5, nbits)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
    @pytest.mark.parametrize("M,nbits,g", [(1, 8, 4), (2, 6, 8), (1, 5, 3)])
    def test_aqlm_weights_dequantize_exactly_through_the_vq_kernel(M, nbits, g, dtype):
        """AQLM-style weights describe themselves as the VPTQ layout of their transpose
        (`AQLMWeight.kernel_layout`): the dequantization kernel reproduces AQLMWeight.dequantize bit
        for bit, and QuantLinear routes through it."""
        from vptq.kernels.layout import from_layout, layout_of

        q = make_aqlm(M, nbits, g=g, inn=8 * g)
        kw = from_layout(layout_of(q))
        assert kw.transposed and (kw.out_features, kw.in_features) == (q.in_features, q.out_features)
        ref = q.dequantize(dtype)
        for cfg in (None, SMALL_DEQUANT):
            Wt = dequantize(kw, dtype, cfg)
            assert torch.equal(Wt.t(), ref), f"{cfg}: max |diff| {float((Wt.t().float() - ref.float()).abs().max())}"
        bias = torch.randn(q.out_features)
        lin_t = QuantLinear(q, bias, kernel="triton").to(DEVICE)
        x = torch.randn(2, 3, q.in_features).to(DEVICE, dtype)
        before = dispatch.STATS["dequant_matmul_t"]
        y = lin_t(x)
        assert dispatch.STATS["dequant_matmul_t"] == before + 1, "the Triton route did not run"
        yr = QuantLinear(q, bias, kernel="torch").to(DEVICE)(x)
        assert y.shape == yr.shape == (2, 3, q.out_features) and rel(y, yr) < TOL[dtype]

    def test_aqlm_with_three_codebooks_falls_back():
        q = make_aqlm(3, 4)
        lin = QuantLinear(q, kernel="triton").to(DEVICE)
        x = torch.randn(1, q.in_features).to(DEVICE)
        assert dispatch.triton_linear(lin, x) is None
        assert torch.equal(lin(x), QuantLinear(q).to(DEVICE)(x))

    def test_cached_buffers_follow_the_weight():
        """The kernel buffers are rebuilt when a stored tensor changes (finetuning steps a codebook in
        place, or replaces it), and a call that needs autograd takes the torch path."""
        q = make_vq(**CASES["v6_k37_pad"])
        lin, ref = QuantLinear(q, kernel="triton").to(DEVICE), QuantLinear(q).to(DEVICE)
        x = torch.randn(1, q.in_features).to(DEVICE)
        with torch.no_grad():
            lin(x)
            q.centroids.mul_(2)  # in place: a new version of the same tensor
            assert rel(lin(x), ref(x)) < TOL[torch.float32]
            q.centroids = -q.centroids  # replaced
            assert rel(lin(x), ref(x)) < TOL[torch.float32]
        assert dispatch.triton_linear(lin, x) is not None
        q.centroids.requires_grad_(True)
        assert dispatch.triton_linear(lin, x) is None
        with torch.no_grad():
            assert dispatch.triton_linear(lin, x) is not None

    def test_unsupported_falls_back():
        q = make_vq(out=8, inn=16, v=4, k=1)  # a 1-entry codebook has no index stream
        lin = QuantLinear(q, kernel="triton").to(DEVICE)
        x = torch.randn(1, 16).to(DEVICE)
        assert dispatch.triton_linear(lin, x) is None
        assert torch.equal(lin(x), QuantLinear(q).to(DEVICE)(x))
        assert dispatch.triton_linear(lin, x.to(torch.float64)) is None  # dtype outside fp16/bf16/fp32
