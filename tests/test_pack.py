"""vptq.pack: exact round trips, bit layout identical to the official VPTQ packer, and the official
unpacker's quirks (residual mask width, padding rule) enforced by check_packable."""
from __future__ import annotations

import pytest
import torch

from vptq.pack import (check_packable, from_uint16_view, index_bits_of, pack_indices, packed_words,
                       to_uint16_view, unpack_indices)

# (index_bits, res_bits, group_size): residual and not, words exactly full and not, 1..32 total bits,
# elements straddling word boundaries, realistic VPTQ widths (12-16 bit main, 8-12 bit residual)
COMBOS = [(1, 0, 32), (2, 0, 17), (3, 2, 11), (4, 0, 8), (4, 4, 63), (5, 0, 13), (7, 3, 10), (8, 0, 4),
          (8, 8, 9), (10, 0, 100), (11, 6, 33), (12, 0, 3), (12, 8, 7), (12, 12, 128), (13, 0, 11),
          (14, 9, 64), (15, 0, 5), (16, 0, 2), (16, 8, 31), (16, 16, 3), (16, 16, 257)]


def _rand(shape, bits, g):
    x = torch.randint(0, 2**bits, shape, generator=g)
    x.view(-1)[:2] = torch.tensor([0, 2**bits - 1])  # both extremes present
    return x


def _reference_pack(idx, ib, res, rb):
    """Independent oracle: expand every merged index to its bits, concatenate, cut into 32-bit words."""
    t = ib + rb
    m = idx.to(torch.int64) | ((res.to(torch.int64) << ib) if rb else 0)  # (..., gs)
    bits = (m.unsqueeze(-1) >> torch.arange(t)) & 1  # (..., gs, t), little endian
    bits = bits.flatten(-2)  # (..., gs*t) the stream
    W = packed_words(idx.shape[-1], t)
    bits = torch.nn.functional.pad(bits, (0, W * 32 - bits.shape[-1]))  # zero padding
    words = (bits.reshape(*bits.shape[:-1], W, 32) << torch.arange(32)).sum(-1)  # (..., W) in [0, 2^32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _official_rule_unpack(packed, ib, gs, rb):
    """The official unpacker's arithmetic (v0.0.5.post1 unpack_index_tensor), re-expressed: drops
    (W*32) % (gs*t) trailing bits and masks the residual with the MAIN width."""
    t = ib + rb
    bits = ((packed.to(torch.int64).unsqueeze(-1) >> torch.arange(32)) & 1).flatten(-2)  # (..., W*32)
    pad = (packed.shape[-1] * 32) % (ib * gs + rb * gs)
    if pad:
        bits = bits[..., :-pad]
    m = (bits.reshape(*bits.shape[:-1], -1, t) << torch.arange(t)).sum(-1)
    return m & ((1 << ib) - 1), ((m >> ib) & ((1 << ib) - 1)) if rb else None


@pytest.mark.parametrize("ib,rb,gs", COMBOS)
def test_round_trip_exact_and_matches_reference(ib, rb, gs):
    g = torch.Generator().manual_seed(ib * 1000 + rb * 100 + gs)
    idx = _rand((3, 5, gs), ib, g)
    res = _rand((3, 5, gs), rb, g) if rb else None
    packed = pack_indices(idx, ib, res, rb)
    assert packed.dtype == torch.int32 and packed.shape == (3, 5, -(-gs * (ib + rb) // 32))
    assert torch.equal(packed, _reference_pack(idx, ib, res, rb))
    a, b = unpack_indices(packed, ib, gs, rb)
    assert a.dtype == torch.int64 and torch.equal(a, idx)
    if rb:
        assert torch.equal(b, res)
    else:
        assert b is None
    oa, ob = _official_rule_unpack(packed, ib, gs, rb)  # what the official loader will read
    assert torch.equal(oa, idx) and (not rb or torch.equal(ob, res))


# golden words computed with the official microsoft/VPTQ 0.0.5.post1 pack_index (interchange venv):
# idx = (arange(2*gs) * 7 + 3) % 2^ib, res = (arange(2*gs) * 5 + 1) % 2^rb, shape (1, 2, gs)
GOLDEN = {
    (4, 0, 8): [[[1299153315], [-974714581]]],
    (3, 2, 5): [[[15754827], [19239862]]],
    (12, 8, 7): [[[10489859, -2135944954, 1344212993, 756679265, 496],
                  [62013492, -1830796759, -2142227708, 1581057395, 1056]]],
    (16, 16, 3): [[[65539, 393226, 720913], [1048600, 1376287, 1703974]]],
    (5, 0, 13): [[[1308378435, 2015648675, 1], [61452478, 630437498, 1]]],
}


@pytest.mark.parametrize("key", sorted(GOLDEN))
def test_golden_words_of_official_packer(key):
    ib, rb, gs = key
    idx = (torch.arange(2 * gs).reshape(1, 2, gs) * 7 + 3) % (2**ib)
    res = ((torch.arange(2 * gs).reshape(1, 2, gs) * 5 + 1) % (2**rb)) if rb else None
    assert pack_indices(idx, ib, res, rb).tolist() == GOLDEN[key]


def test_check_packable_matches_the_official_padding_rule():
    """check_packable accepts exactly the (group_size, bits) the official unpacker reads back."""
    g = torch.Generator().manual_seed(0)
    accepted = rejected = 0
    for t in (3, 4, 6, 8, 12, 16):
        for gs in range(1, 12):
            ok = (packed_words(gs, t) * 32) % (gs * t) == packed_words(gs, t) * 32 - gs * t
            if not ok:
                with pytest.raises(ValueError, match=f"group_size={gs}"):
                    check_packable(gs, t)
                rejected += 1
                continue
            check_packable(gs, t)
            idx = torch.randint(0, 2**t, (2, gs), generator=g)
            assert torch.equal(_official_rule_unpack(pack_indices(idx, t), t, gs, 0)[0], idx)
            accepted += 1
    assert accepted > 40 and rejected >= 5  # e.g. group_size=1 with 12 bits is misread


@pytest.mark.parametrize("ib,rb,gs,needle", [
    (8, 9, 16, "res_bits=9 > index_bits=8"),  # residual masked with the main width
    (0, 0, 16, "index_bits=0"),
    (17, 0, 16, "index_bits=17"),
    (1, 0, 1, "group_size=1"),  # 1 bit in a 32-bit word: padding rule misreads it
    (12, 0, 1, "group_size=1"),
])
def test_check_packable_one_line_errors(ib, rb, gs, needle):
    with pytest.raises(ValueError, match=needle) as e:
        check_packable(gs, ib, rb)
    assert "\n" not in str(e.value) and "valid" in str(e.value)


def test_out_of_range_values_refused():
    with pytest.raises(ValueError, match="indices out of range for 4 bits"):
        pack_indices(torch.tensor([[0, 16, 1, 2, 3, 4, 5, 6]]), 4)
    with pytest.raises(ValueError, match="res_indices out of range for 2 bits"):
        pack_indices(torch.zeros(1, 8, dtype=torch.long), 4, torch.full((1, 8), 4), 2)
    with pytest.raises(ValueError, match="expected int32"):
        unpack_indices(torch.zeros(1, 3, dtype=torch.int64), 4, 8)


def test_uint16_views_round_trip():
    x = torch.tensor([0, 1, 32767, 32768, 40000, 65535])
    v = to_uint16_view(x)
    assert v.dtype == torch.int16 and v.tolist()[3] == -32768
    assert torch.equal(v.view(torch.uint16).to(torch.int64), x)  # the official loader's reading
    assert torch.equal(from_uint16_view(v), x)
    with pytest.raises(ValueError):
        to_uint16_view(torch.tensor([65536]))


@pytest.mark.parametrize("k,bits", [(2, 1), (3, 2), (4096, 12), (4097, 13), (65536, 16)])
def test_index_bits_of(k, bits):
    assert index_bits_of(k) == bits


def test_large_tensor_is_vectorized():
    """Half a 4096x4096 layer's indices (v=8, 12+8 bits) pack and unpack in well under a second."""
    import time

    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 4096, (1, 256, 4096), generator=g)
    res = torch.randint(0, 256, (1, 256, 4096), generator=g)
    t0 = time.perf_counter()
    a, b = unpack_indices(pack_indices(idx, 12, res, 8), 12, 4096, 8)
    assert torch.equal(a, idx) and torch.equal(b, res)
    assert time.perf_counter() - t0 < 5.0


# ----------------------------------------------------------------------------- vptq.numerics
def test_shared_numeric_helpers():
    """One copy of each helper (vptq.numerics): ceil(log2 k), the uint8 bit stream, the two
    named float16 overflow rules, deterministic segment sums."""
    from vptq.numerics import Segments, ceil_log2, pack_bits, round_fp16, unpack_bits

    assert [ceil_log2(k) for k in (1, 2, 3, 4, 5, 256, 257, 65536)] == [0, 1, 2, 2, 3, 8, 9, 16]
    x = torch.randint(0, 2**11, (5, 17), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_bits(pack_bits(x, 11), 11, x.numel()).reshape(5, 17), x)
    with pytest.raises(ValueError, match=r"out of range for 3 bits.*valid: 0..7"):
        pack_bits(torch.tensor([8]), 3)
    t = torch.tensor([1.0, 70000.0, -1e6])
    assert round_fp16(t, overflow="clamp").tolist() == [1.0, 65504.0, -65504.0]
    with pytest.raises(ValueError, match="overflows float16"):
        round_fp16(t, overflow="raise")
    with pytest.raises(ValueError, match=r"overflow='wrap'; valid: raise, clamp"):
        round_fp16(t, overflow="wrap")
    idx = torch.tensor([2, 0, 2, 1, 0])
    v = torch.arange(10, dtype=torch.float32).reshape(5, 2)
    seg = Segments(idx, 4)
    assert seg.sum(v).tolist() == [[10.0, 12.0], [6.0, 7.0], [4.0, 6.0], [0.0, 0.0]]
    assert torch.equal(seg.sum(v), seg.sum(v))  # same kernels, same order: bitwise
