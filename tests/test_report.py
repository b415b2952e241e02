"""The results table: realized bits, units in headers, best bold / second underlined per column."""
from __future__ import annotations

import json

from analysis.report import write_report


def _run(tmp, name, method, target, total, ppl, qa=None, qtime=1.0, model="m", status="ok", **extra):
    d = tmp / name
    d.mkdir()
    m = {"run_key": name, "model": model, "method": method, "status": status,
         "bits": {"target": target, "index": total - 0.05 if total else None, "total": total},
         "ppl": {"wikitext2": ppl}, "eval": {"seqlen": 2048},
         "qa": {"piqa": {"acc": qa}} if qa is not None else {},
         "time": {"quantize_s": qtime}, "settings": {}, **extra}
    if status != "ok":
        m = {"run_key": name, "model": model, "method": method, "status": status, "error": "boom",
             "bits": {"target": target}}
    (d / "metrics.json").write_text(json.dumps(m))


def _cells(md: str, method: str, target: str, model="m"):
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 3 and cells[0] == model and cells[1] == method and cells[2] == target:
            return cells
    raise AssertionError(f"no row {method} {target}")


def test_bold_best_and_underline_second(tmp_path):
    _run(tmp_path, "a", "fp16", None, 16.0, 5.00, qa=0.80, qtime=0.0)
    _run(tmp_path, "b", "rtn", 2.0, 2.03, 90.0, qa=0.50, qtime=1.0)
    _run(tmp_path, "c", "gptq", 2.0, 2.06, 12.0, qa=0.60, qtime=30.0)
    _run(tmp_path, "d", "vptq", 2.0, 2.10, 7.5, qa=0.70, qtime=60.0)
    _run(tmp_path, "e", "aqlm", 2.0, 2.03, 8.0, qa=0.70, qtime=600.0)  # ties rtn on bits, vptq on qa
    _run(tmp_path, "f", "vptq", 3.0, 0, 0, status="failed")
    _run(tmp_path, "g", "vptq", 2.0, 2.5, 99.0, model="other")  # other model: ranked separately
    write_report(str(tmp_path))
    md = (tmp_path / "results.md").read_text()
    header = md.splitlines()[2]
    for h in ("bits/weight (total) ↓", "PPL wikitext2 @2048 ↓", "piqa acc (%) ↑", "quant time (s) ↓"):
        assert h in header
    cols = [c.strip() for c in header.strip("|").split("|")]
    ppl, bits, qa, qt = (cols.index(h) for h in ("PPL wikitext2 @2048 ↓", "bits/weight (total) ↓",
                                                  "piqa acc (%) ↑", "quant time (s) ↓"))
    fp16, rtn, gptq = _cells(md, "fp16", "—"), _cells(md, "rtn", "2"), _cells(md, "gptq", "2")
    vptq, aqlm = _cells(md, "vptq", "2"), _cells(md, "aqlm", "2")
    # the reference is shown, never ranked
    assert fp16[ppl] == "5.00" and fp16[qa] == "80.0"
    # lower is better: PPL
    assert vptq[ppl] == "**7.50**" and aqlm[ppl] == "<u>8.00</u>" and gptq[ppl] == "12.00"
    # higher is better with a tie for best: both bold, next distinct value underlined
    assert vptq[qa] == "**70.0**" and aqlm[qa] == "**70.0**" and gptq[qa] == "<u>60.0</u>" and rtn[qa] == "50.0"
    # ties on bits: both best
    assert rtn[bits] == "**2.030**" and aqlm[bits] == "**2.030**" and gptq[bits] == "<u>2.060</u>"
    assert rtn[qt] == "**1.0**" and gptq[qt] == "<u>30.0</u>"
    # the other model's only row is its own best
    assert _cells(md, "vptq", "2", model="other")[ppl] == "**99.00**"
    assert "Failed jobs" in md and "boom" in md
    tex = (tmp_path / "results.tex").read_text()
    assert r"\textbf{7.50}" in tex and r"\underline{8.00}" in tex and r"$\downarrow$" in tex


def test_failed_run_replaced_by_later_success(tmp_path):
    _run(tmp_path, "x", "rtn", 3.0, 0, 0, status="failed")
    d = tmp_path / "x2"
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps({"run_key": "x", "model": "m", "method": "rtn", "status": "ok",
                                                "bits": {"target": 3.0, "index": 3.0, "total": 3.03},
                                                "ppl": {"p": 9.0}, "eval": {"seqlen": 8}, "time": {"quantize_s": 1}}))
    t = write_report(str(tmp_path))
    assert len(t) == 1 and "Failed jobs" not in (tmp_path / "results.md").read_text()


def test_seeds_averaged_with_spread_and_only_within_one_configuration(tmp_path):
    """Three seeds of one config -> one row "mean ± sample std" with seeds = 3; a run that differs in
    its calibration is its own row (a calibration column tells them apart), never averaged in."""
    cal = {"data": "wikitext2", "nsamples": 128, "seqlen": 2048}
    for i, (p, q) in enumerate([(70.0, 0.60), (72.0, 0.62), (74.0, 0.64)]):
        _run(tmp_path, f"s{i}", "vptq", 2.0, 2.05, p, qa=q, seed=i, config_key="A", calib=cal)
    _run(tmp_path, "c", "vptq", 2.0, 2.05, 60.0, qa=0.70, seed=0, config_key="B", calib={**cal, "nsamples": 32})
    _run(tmp_path, "r", "rtn", 2.0, 2.03, 900.0, seed=0, config_key="C")
    table = write_report(str(tmp_path))
    assert len(table) == 3
    md = (tmp_path / "results.md").read_text()
    cols = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    ppl, qa, seeds, calib = (cols.index(h) for h in ("PPL wikitext2 @2048 ↓", "piqa acc (%) ↑", "seeds", "calibration"))
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in md.splitlines() if ln.startswith("| m | vptq")]
    three = next(r for r in rows if r[seeds] == "3")
    one = next(r for r in rows if r[seeds] == "1")
    assert three[ppl] == "<u>72.00 ± 2.00</u>" and three[qa] == "<u>62.0 ± 2.0</u>"  # std over (70, 72, 74)
    assert three[calib] == "wikitext2 128x2048" and one[calib] == "wikitext2 32x2048"
    assert one[ppl] == "**60.00**"  # one seed: no spread shown
    assert "sample standard deviation" in md
    paper = (tmp_path / "results_paper.tex").read_text()
    assert r"72.00\,{\scriptsize$\pm$2.00}" in paper
