"""Bad files get one clear line: a truncated or corrupt model shard, block checkpoint, Hessian cache
file or metrics.json names the file and what is wrong; a damaged cache is recomputed; the report
skips an unreadable metrics.json instead of crashing."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from runners.files import BadFile, check_model_folder, check_safetensors, read_json
from tests.helpers import metrics_under, run_cli


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _tiny_folder(tmp_path):
    from runners.models import tiny_model
    from runners.schema import ModelConfig, TinyModelConfig

    model, tok = tiny_model(ModelConfig(name="t", source="tiny", tiny=TinyModelConfig(num_hidden_layers=1)))
    d = tmp_path / "model"
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


@pytest.mark.parametrize("keep,what", [(0.5, "truncated or corrupt"), (0.0, "truncated or corrupt"),
                                       (0.001, "truncated or corrupt")])
def test_check_safetensors_names_the_file(tmp_path, keep, what):
    from safetensors.torch import save_file

    p = tmp_path / "x.safetensors"
    save_file({"a": torch.randn(64, 64)}, str(p))
    check_safetensors(str(p))  # a complete file passes
    _truncate(p, keep)
    with pytest.raises(BadFile) as e:
        check_safetensors(str(p))
    msg = str(e.value)
    assert msg.startswith(str(p)) and what in msg and "\n" not in msg


def test_model_folder_index_naming_a_missing_shard(tmp_path):
    d = _tiny_folder(tmp_path)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(BadFile, match="model-00002-of-00002.safetensors.*not in the folder"):
        check_model_folder(str(d))


@pytest.mark.slow
def test_truncated_model_shard_is_one_line_naming_it(tmp_path):
    d = _tiny_folder(tmp_path)
    _truncate(d / "model.safetensors")
    r = run_cli(["model=hf", f"model.path={d}", "model.dtype=float32", "method=rtn", "bits=4", "eval.seqlen=32",
                 "eval.max_windows=2", "logger=none", f"hydra.run.dir={tmp_path / 'run'}",
                 f"results_root={tmp_path}"])
    assert r.returncode != 0
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert err[-1].startswith("error: ") and str(d / "model.safetensors") in err[-1], r.stderr[-2000:]
    assert "truncated or corrupt" in err[-1] and "Traceback" not in r.stderr + r.stdout
    (m,) = metrics_under(tmp_path / "run")  # nothing half-written: one metrics.json that says failed
    assert m["status"] == "failed" and str(d / "model.safetensors") in m["error"]


@pytest.mark.parametrize("content,what", [("", "empty"), ('{"run_key": "ab', "not valid JSON"),
                                          ("\xff\xfe", "not UTF-8 text")])
def test_read_json_one_line(tmp_path, content, what):
    p = tmp_path / "metrics.json"
    p.write_text(content, encoding="latin-1")
    with pytest.raises(BadFile) as e:
        read_json(str(p))
    assert str(e.value).startswith(str(p)) and what in str(e.value)


def test_report_skips_an_unreadable_metrics_json(tmp_path, capsys):
    from analysis.report import write_report
    from runners.metrics import find_finished

    ok = {"run_key": "k1", "config_key": "c1", "model": "tiny", "method": "rtn", "status": "ok",
          "bits": {"target": 4.0, "index": 4.0, "total": 4.2}, "ppl": {"pydoc": 10.0},
          "time": {"quantize_s": 1.0, "eval_s": 1.0}, "memory": {"peak_rss_gb": 1.0}, "settings": {},
          "eval": {"seqlen": 64, "windows": {"pydoc": 4}}, "seed": 0}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.json").write_text(json.dumps(ok))
    (tmp_path / "b").mkdir()
    bad = tmp_path / "b" / "metrics.json"
    bad.write_text(json.dumps(ok)[:40])  # a job killed while another tool copied the file
    table = write_report(str(tmp_path))
    assert list(table["method"]) == ["rtn"]
    err = capsys.readouterr().err
    assert f"skipped {bad}: not valid JSON" in err
    assert find_finished(str(tmp_path), "k1").endswith("a/metrics.json")


def _gptq_like():
    from tests.test_checkpoint import _GPTQLike

    return _GPTQLike(_GPTQLike.Config(), bits=3, seed=0)


def _tiny3():
    from tests.test_checkpoint import _model

    return _model()


@pytest.mark.slow
def test_corrupt_block_checkpoint_is_named_and_quantized_again(tmp_path, caplog):
    from runners.driver import quantize_model
    from tests.test_checkpoint import _weights

    calib = torch.randint(0, 250, (4, 32), generator=torch.Generator().manual_seed(0))
    ck = tmp_path / "ck"
    ref = _tiny3()
    quantize_model(ref, _gptq_like(), calib=calib, device="cpu", checkpoint_dir=str(ck))
    _truncate(ck / "block001.safetensors")
    m = _tiny3()
    with caplog.at_level(logging.WARNING):
        st = quantize_model(m, _gptq_like(), calib=calib, device="cpu", checkpoint_dir=str(ck))
    assert [b.get("resumed", False) for b in st.blocks] == [True, False, True]
    msgs = [r.getMessage() for r in caplog.records if "block001.safetensors" in r.getMessage()]
    assert len(msgs) == 1 and "truncated or corrupt" in msgs[0] and "quantizing it again" in msgs[0]
    a, b = _weights(ref), _weights(m)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same code on the same inputs: bitwise
    check_safetensors(str(ck / "block001.safetensors"))  # rewritten whole


@pytest.mark.slow
def test_corrupt_hessian_cache_is_named_and_recomputed(tmp_path, caplog):
    from runners.driver import quantize_model
    from tests.test_checkpoint import _weights

    calib = torch.randint(0, 250, (4, 32), generator=torch.Generator().manual_seed(0))
    hd = tmp_path / "hess"
    ref = _tiny3()
    quantize_model(ref, _gptq_like(), calib=calib, device="cpu", protocol="float", hessian_dir=str(hd))
    _truncate(hd / "block000.safetensors", 0.3)
    m = _tiny3()
    with caplog.at_level(logging.WARNING):
        quantize_model(m, _gptq_like(), calib=calib, device="cpu", protocol="float", hessian_dir=str(hd))
    msgs = [r.getMessage() for r in caplog.records if "block000.safetensors" in r.getMessage()]
    assert len(msgs) == 1 and "truncated or corrupt; computing it again" in msgs[0]
    a, b = _weights(ref), _weights(m)
    assert all(torch.equal(a[k], b[k]) for k in a)
    check_safetensors(str(hd / "block000.safetensors"))


def test_other_cpu_cores_is_the_machines_busy_time_less_our_own():
    """time.other_cpu_cores: (machine busy CPU s - this process's CPU s) / wall s, never negative,
    None without two samples; a live sample reads /proc/stat where there is one."""
    from runners.metrics import cpu_sample, other_cpu_cores

    assert other_cpu_cores((0.0, 100.0, 5.0), (10.0, 118.0, 13.0)) == 1.0  # 18 s busy, 8 ours, over 10 s
    assert other_cpu_cores((0.0, 100.0, 5.0), (10.0, 104.0, 9.5)) == 0.0  # tick rounding below our own
    assert other_cpu_cores(None, (1.0, 1.0, 1.0)) is None
    s = cpu_sample()
    assert s is None or (len(s) == 3 and s[1] >= 0 and s[2] >= 0)
