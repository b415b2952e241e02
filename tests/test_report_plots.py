"""The report's extras: the papers' LaTeX layout, the Pareto plots, multi-corpus headers with each
corpus' own seqlen, cost columns, and the W&B report run (offline)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from analysis.report import write_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande")


def _run(root, name, method, target, total, w2, c4, acc, qtime=60.0, mem=1.5, model="llama2_7b"):
    d = root / name
    d.mkdir(parents=True)
    qa = {t: {"acc": acc + 0.01 * i, "acc_norm": acc + 0.02 * i} for i, t in enumerate(TASKS)}
    qa["winogrande"].pop("acc_norm")  # lm-eval's winogrande reports acc only
    qa["mean"] = {"acc": sum(v["acc"] for v in qa.values()) / 5}
    m = {"run_key": name, "model": model, "method": method, "status": "ok",
         "bits": {"target": target, "index": None if total is None else total - 0.05, "total": total},
         "ppl": {"wikitext2": w2, "c4": c4}, "eval": {"seqlen": 2048, "seqlens": {"wikitext2": 4096, "c4": 2048}},
         "qa": qa, "time": {"quantize_s": qtime}, "memory": {"peak_rss_gb": 3.0, "peak_gpu_gb": mem},
         "settings": {}}
    (d / "metrics.json").write_text(json.dumps(m))


@pytest.fixture
def results(tmp_path):
    _run(tmp_path, "fp", "fp16", None, 16.0, 5.12, 6.63, 0.70, qtime=0.0, mem=13.0)
    for b, (r, g, v) in {2.0: (5e3, 40.0, 6.9), 3.0: (60.0, 6.3, 5.6), 4.0: (6.1, 5.6, 5.3)}.items():
        _run(tmp_path, f"rtn{b}", "rtn", b, b + 0.13, r, r * 1.2, 0.40 + b / 100, qtime=5.0, mem=3.0)
        _run(tmp_path, f"gptq{b}", "gptq", b, b + 0.15, g, g * 1.2, 0.50 + b / 100, qtime=900.0, mem=6.0)
        _run(tmp_path, f"vptq{b}", "vptq", b, b + 0.02, v, v * 1.2, 0.60 + b / 100, qtime=9000.0, mem=8.0)
    return tmp_path


def _tex_row(tex, method, bits):
    for line in tex.splitlines():
        cells = [c.strip() for c in line.rstrip("\\ ").split("&")]
        if len(cells) > 2 and cells[0] == method and cells[1] == bits:
            return cells
    raise AssertionError(f"no row {method} {bits}")


def test_paper_table_layout_bold_and_units(results):
    write_report(str(results))
    tex = (results / "results_paper.tex").read_text()
    header = next(l for l in tex.splitlines() if l.startswith("Method"))
    cols = [c.strip() for c in header.rstrip("\\ ").split("&")]
    # W2 and C4 first, each with its own seqlen; the five tasks in the papers' order; cost with units
    assert cols == ["Method", "W bits", "W2 @4096", "C4 @2048", "ArcE", "ArcC", "HellaS", "PiQA", "WinoG",
                    "AvgQA", "bits", "time (h)", "mem (GB)"]
    assert r"\multicolumn{2}{c}{PPL $\downarrow$}" in tex and r"\cmidrule(lr){3-4}" in tex
    w2, avg, t = cols.index("W2 @4096"), cols.index("AvgQA"), cols.index("time (h)")
    vptq2, gptq2, fp = _tex_row(tex, "vptq", "2"), _tex_row(tex, "gptq", "2"), _tex_row(tex, "fp16", "16")
    assert fp[w2] == "5.12"  # reference: shown, never ranked
    # ranked within each (model, W bits) group, as in the papers
    assert vptq2[w2] == r"\textbf{6.90}" and gptq2[w2] == r"\underline{40.00}" and _tex_row(tex, "rtn", "2")[w2] == "5000.00"
    assert _tex_row(tex, "vptq", "4")[w2] == r"\textbf{5.30}" and _tex_row(tex, "gptq", "4")[w2] == r"\underline{5.60}"
    assert _tex_row(tex, "vptq", "3")[avg] == r"\textbf{65.00}" and _tex_row(tex, "gptq", "3")[avg] == r"\underline{55.00}"
    assert _tex_row(tex, "rtn", "2")[t] == r"\textbf{0.001}" and gptq2[t] == r"\underline{0.250}"
    assert _tex_row(tex, "rtn", "2")[cols.index("WinoG")] == "46.00"  # acc in %, 2 decimals
    assert vptq2[cols.index("bits")] == r"\textbf{2.020}" and vptq2[cols.index("mem (GB)")] == "8.00"
    # one group of rows per target bits, the reference first
    body = [l.split("&")[:2] for l in tex.splitlines() if l.count("&") > 5 and not l.startswith(("Method", " &"))]
    assert [(m.strip(), b.strip()) for m, b in body] == [("fp16", "16")] + [
        (m, b) for b in "234" for m in ("rtn", "gptq", "vptq")]
    md = (results / "results.md").read_text()
    head = md.splitlines()[2]
    for h in ("PPL wikitext2 @4096 ↓", "PPL c4 @2048 ↓", "quant time (s) ↓", "mem (GB) ↓", "AvgQA acc (%) ↑"):
        assert h in head, head
    assert "mem/GB" not in md + tex


def test_paper_table_acc_norm_choice(results):
    write_report(str(results), qa_metric="acc_norm")
    tex = (results / "results_paper.tex").read_text()
    assert r"Zero-shot acc\_norm" in tex
    # winogrande has no acc_norm: its column is absent rather than empty
    header = next(l for l in tex.splitlines() if l.startswith("Method"))
    assert "WinoG" not in header and "PiQA" in header


def test_pareto_plot_per_model_and_dataset(results):
    _run(results, "other", "vptq", 2.0, 2.1, 9.0, 11.0, 0.5, model="tiny")
    table = write_report(str(results))
    plots = table.attrs["plots"]
    assert sorted(plots) == ["llama2_7b/c4@2048", "llama2_7b/wikitext2@4096", "tiny/c4@2048", "tiny/wikitext2@4096"]
    for p in plots.values():
        with open(p, "rb") as f:
            head = f.read(24)
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        assert (w, h) == (768, 528) and os.path.getsize(p) > 20_000  # drawn, not blank
    assert "pareto_llama2_7b_wikitext2_4096.png" in (results / "results.md").read_text()


def test_pareto_front():
    from analysis.plots import pareto_front

    pts = [(2.1, 9.0), (2.0, 12.0), (3.0, 10.0), (3.1, 6.0), (4.0, 6.5)]
    assert pareto_front(pts) == [(2.0, 12.0), (2.1, 9.0), (3.1, 6.0)]


@pytest.mark.slow
def test_report_cli_wandb_offline(results):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    r = subprocess.run([sys.executable, os.path.join(REPO, "analysis", "report.py"), str(results), "--wandb"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "10 rows" in r.stdout and "2 plot(s)" in r.stdout  # one model, two corpora
    runs = list((results / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = [str(p.relative_to(runs[0])) for p in runs[0].rglob("*") if p.is_file()]
    assert any(re.search(r"media/table/results_\d+_.*\.table\.json$", f) for f in files), files
    assert sum(bool(re.search(r"media/images/pareto/.*\.png$", f)) for f in files) == 2, files
    table = json.loads(next(p for p in runs[0].rglob("*.table.json")).read_text())
    assert len(table["data"]) == 10 and "bits_total" in table["columns"]


def read_wandb_records(path):
    """The records of an offline W&B run file (.wandb: a LevelDB-style log of protobuf records)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    b, pos, block, out, buf = open(path, "rb").read(), 7, 32768, [], b""
    while pos + 7 <= len(b):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", b[pos:pos + 7])
        data, pos = b[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 0 and n == 0:
            break
        if kind in (1, 4):  # full, last
            r = pb.Record()
            r.ParseFromString(buf + data)
            out.append(r)
            buf = b""
        else:  # first, middle
            buf += data
    return out


@pytest.mark.slow
def test_wandb_job_run_block_curves_group_and_tags(tmp_path):
    """logger=wandb in a sweep: per-block curves (time, relative proxy loss) against the block
    index as history, the sweep as the group, model/method/bits as tags, the metrics as summary."""
    from tests.helpers import run_cli

    sweep = tmp_path / "sweep-a"
    r = run_cli(["-m", "model=tiny_llama", "eval.seqlen=64", "eval.max_windows=2", "calib.nsamples=4",
                 "calib.seqlen=32", "method=gptq", "bits=4", "logger=wandb", f"hydra.sweep.dir={sweep}",
                 f"results_root={tmp_path}"])
    assert r.returncode == 0, r.stderr[-3000:]
    files = list(sweep.rglob("offline-run-*/*.wandb"))
    assert len(files) == 1
    recs = read_wandb_records(str(files[0]))
    run = next(x.run for x in recs if x.WhichOneof("record_type") == "run")
    assert run.run_group == "sweep-a" and {"model:tiny_llama", "method:gptq", "bits:4.0"} <= set(run.tags)
    hist = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in x.history.item} for x in recs
            if x.WhichOneof("record_type") == "history"]
    hist = [h for h in hist if any(k.startswith("quant/") for k in h)]
    assert [h["quant/block"] for h in hist] == [0, 1]
    assert all(h["quant/time_s"] > 0 and 0 < h["quant/mean_rel_proxy_loss"] < 1 for h in hist)
    metrics = {(x.metric.name or x.metric.glob_name): x.metric.step_metric for x in recs
               if x.WhichOneof("record_type") == "metric"}
    assert metrics.get("quant/*") == "quant/block"
    summary = {i.key or "/".join(i.nested_key): i.value_json for x in recs if x.WhichOneof("record_type") == "summary"
               for i in x.summary.update}
    assert float(summary["ppl/pydoc"]) > 1 and summary["status"] == '"ok"'
