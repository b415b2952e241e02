"""Per-block checkpoints: a run interrupted after block 0 resumes at block 1 and ends bit-identical
to an uninterrupted run; every registered method's weights survive save/load exactly."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from baselines.scalar import ScalarGrid, ScalarWeight
from runners.driver import quantize_model
from runners.models import tiny_model
from runners.schema import ModelConfig, TinyModelConfig
from vptq.methods import Method
from vptq.qlinear import QuantLinear
from vptq.solver import error_feedback, prepare_hessian


class _GPTQLike(Method):
    """A minimal Hessian-using method for driver tests (per-channel 3-bit grid + the solver)."""
    name = "test_gptq"

    @dataclass
    class Config:
        name: str = "test_gptq"

    def quantize_layer(self, W, H, *, name):
        W, H, _ = prepare_hessian(W, H)
        grid = ScalarGrid(3)
        s, z = grid.fit(W)
        codes = torch.zeros_like(W, dtype=torch.int64)

        def qc(col, Wc):
            q = grid.quantize(Wc, s, z)
            codes[:, col:col + Wc.shape[1]] = q
            return ScalarGrid.dequantize(q, s, z)

        error_feedback(W, H, qc, block_size=16)
        return ScalarWeight(codes, s[:, None], z[:, None], 3, None)


class _Boom(Exception):
    pass


def _model():
    m, _ = tiny_model(ModelConfig(name="t", source="tiny", tiny=TinyModelConfig(num_hidden_layers=3)))
    return m.eval()


def _weights(model):
    return {n: m.qweight.dequantize() for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.slow
def test_resume_at_first_unfinished_block_is_bit_identical(tmp_path):
    calib = torch.randint(0, 250, (4, 32), generator=torch.Generator().manual_seed(0))
    method = _GPTQLike(_GPTQLike.Config(), bits=3, seed=0)
    base = _model()
    ref = copy.deepcopy(base)
    quantize_model(ref, method, calib=calib, device="cpu")

    ck = tmp_path / "ck"
    calls = []

    def die_after_first(rec):
        calls.append(rec["block"])
        if rec["block"] == 1:
            raise _Boom

    m1 = copy.deepcopy(base)
    with pytest.raises(_Boom):
        quantize_model(m1, method, calib=calib, device="cpu", checkpoint_dir=str(ck), on_block=die_after_first)
    assert sorted(p.name for p in ck.iterdir()) == ["block000.safetensors", "block001.safetensors"]
    m2 = copy.deepcopy(base)
    st = quantize_model(m2, method, calib=calib, device="cpu", checkpoint_dir=str(ck))
    assert [b.get("resumed", False) for b in st.blocks] == [True, True, False]
    a, b = _weights(ref), _weights(m2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randint(0, 250, (1, 16))
    assert torch.equal(ref(x).logits, m2(x).logits)


@pytest.mark.slow
def test_checkpoints_of_other_code_are_quantized_again(tmp_path, monkeypatch):
    """A block saved by other quantization code (checkpoint `code` differs) is not reused."""
    import runners.checkpoint as C

    calib = torch.randint(0, 250, (4, 32), generator=torch.Generator().manual_seed(0))
    method = _GPTQLike(_GPTQLike.Config(), bits=3, seed=0)
    ck = tmp_path / "ck"
    quantize_model(_model(), method, calib=calib, device="cpu", checkpoint_dir=str(ck))
    assert C.block_done(str(ck), 0) and C.finished_blocks(str(ck), 3) == 3
    st = quantize_model(_model(), method, calib=calib, device="cpu", checkpoint_dir=str(ck))
    assert [b.get("resumed", False) for b in st.blocks] == [True, True, True]
    monkeypatch.setattr(C, "code_version", lambda: "0123456789abcdef")  # the code changed
    assert not C.block_done(str(ck), 0) and C.finished_blocks(str(ck), 3) == 0
    st = quantize_model(_model(), method, calib=calib, device="cpu", checkpoint_dir=str(ck))
    assert [b.get("resumed", False) for b in st.blocks] == [False, False, False]
    assert C.block_done(str(ck), 2)  # rewritten under the current code


def test_code_version_tracks_the_quantization_sources(tmp_path, monkeypatch):
    """An edit to a method's source changes the version; an edit to a kernel does not."""
    import runners.checkpoint as C

    for rel in ("vptq/solver.py", "vptq/kernels/gemv.py", "baselines/gptq.py", "runners/driver.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\n")
    monkeypatch.setattr(C, "REPO", str(tmp_path))

    def version():
        C.code_version.cache_clear()
        return C.code_version()

    try:
        v0 = version()
        (tmp_path / "vptq/kernels/gemv.py").write_text("# faster\n")
        assert version() == v0
        (tmp_path / "baselines/gptq.py").write_text("# another damping\n")
        v1 = version()
        assert v1 != v0 and len(v1) == 16
        (tmp_path / "runners/driver.py").write_text("# changed\n")
        assert version() != v1
    finally:
        C.code_version.cache_clear()


def test_only_blocks_needs_float_protocol():
    with pytest.raises(ValueError, match="hessian.protocol=float"):
        quantize_model(_model(), _GPTQLike(_GPTQLike.Config(), bits=3), calib=torch.zeros(1, 8, dtype=torch.long),
                       device="cpu", only_blocks=[0])


def _registered():
    from vptq.methods import METHODS, method_class

    return [n for n in METHODS if method_class(n).quantizes]


@pytest.mark.slow
@pytest.mark.parametrize("name", _registered())
def test_every_method_weight_roundtrips_through_checkpoint(tmp_path, name):
    """Quantize one block of the tiny model with each registered method, save, load: exact."""
    from vptq.methods import build_method, method_class

    cls = method_class(name)
    model = _model()
    calib = torch.randint(0, 250, (2, 32), generator=torch.Generator().manual_seed(1))
    from runners.driver import quantized_shapes
    from vptq.methods import BudgetError

    for bits in (4.0, 8.0, 16.0):  # the smallest budget this method can express on 64-wide layers
        method = build_method(name, cls.Config(), bits=bits, seed=0)
        try:
            method.check_budget(quantized_shapes(model))
            break
        except BudgetError:
            continue
    quantize_model(model, method, calib=calib, device="cpu", checkpoint_dir=str(tmp_path))
    fresh = _model()
    quantize_model(fresh, method, calib=calib, device="cpu", checkpoint_dir=str(tmp_path))  # all loaded
    a, b = _weights(model), _weights(fresh)
    assert a and all(torch.equal(a[k], b[k]) for k in a)


def test_block_finetuned_float_parameters_survive_resume(tmp_path):
    """Block finetuning may train a block's RMSNorm weights (finetune=layer, AQLM's own finetuning): a block
    loaded from its checkpoint carries them, so a resumed (or block-job-assembled) model equals the uninterrupted one."""
    calib = torch.randint(0, 250, (4, 32), generator=torch.Generator().manual_seed(0))
    method = _GPTQLike(_GPTQLike.Config(), bits=3, seed=0)

    def train_norms(block, ctx):  # a stand-in for finetuning: moves every norm weight, deterministically
        with torch.no_grad():
            for n, p in block.named_parameters():
                if "norm" in n:
                    p.mul_(1.0 + 0.01 * (ctx.index + 1))
        return {}

    ref = _model()
    quantize_model(ref, method, calib=calib, device="cpu", block_finetune=train_norms)
    ck = tmp_path / "ck"
    with pytest.raises(_Boom):
        quantize_model(_model(), method, calib=calib, device="cpu", checkpoint_dir=str(ck), block_finetune=train_norms,
                       on_block=lambda rec: (_ for _ in ()).throw(_Boom()) if rec["block"] == 1 else None)
    m2 = _model()
    st = quantize_model(m2, method, calib=calib, device="cpu", checkpoint_dir=str(ck), block_finetune=train_norms)
    assert [b.get("resumed", False) for b in st.blocks] == [True, True, False]
    a, b = dict(ref.named_parameters()), dict(m2.named_parameters())
    norms = [n for n in a if "layers" in n and "norm" in n]
    assert len(norms) == 6 and all(torch.equal(a[n], b[n]) for n in norms)
    x = torch.randint(0, 250, (1, 16))
    assert torch.equal(ref(x).logits, m2(x).logits)
