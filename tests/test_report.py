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


def test_noise_decides_bold_or_tied(tmp_path):
    """Seeds: 70 ± 1 vs 75 ± 1 -> the gap (5) beats the combined spread (2): bold. 70 ± 3 vs 73 ± 3 -> within the
    noise: both marked tied, nothing bold. Without seeds the 95% interval over windows decides."""
    for i, p in enumerate([69.0, 70.0, 71.0]):
        _run(tmp_path, f"a{i}", "vptq", 2.0, 2.05, p, seed=i, config_key="A")
    for i, p in enumerate([74.0, 75.0, 76.0]):
        _run(tmp_path, f"b{i}", "gptvq", 2.0, 2.08, p, seed=i, config_key="B")
    for i, p in enumerate([67.0, 70.0, 73.0]):
        _run(tmp_path, f"c{i}", "vptq", 3.0, 3.05, p, model="m2", seed=i, config_key="C")
    for i, p in enumerate([70.0, 73.0, 76.0]):
        _run(tmp_path, f"d{i}", "gptvq", 3.0, 3.08, p, model="m2", seed=i, config_key="D")
    ci = lambda lo, hi: {"wikitext2": {"low": lo, "high": hi, "level": 0.95}}  # noqa: E731
    _run(tmp_path, "e", "vptq", 4.0, 4.05, 10.0, model="m3", ppl_ci=ci(9.0, 11.0), config_key="E")
    _run(tmp_path, "f", "gptvq", 4.0, 4.08, 10.5, model="m3", ppl_ci=ci(9.6, 11.4), config_key="F")
    _run(tmp_path, "g", "rtn", 4.0, 4.03, 20.0, model="m3", ppl_ci=ci(18.0, 22.0), config_key="G")
    write_report(str(tmp_path))
    md = (tmp_path / "results.md").read_text()
    cols = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    ppl = cols.index("PPL wikitext2 @2048 ↓")
    assert _cells(md, "vptq", "2")[ppl] == "**70.00 ± 1.00**" and _cells(md, "gptvq", "2")[ppl] == "<u>75.00 ± 1.00</u>"
    assert _cells(md, "vptq", "3", "m2")[ppl] == "70.00 ± 3.00 ≈" and _cells(md, "gptvq", "3", "m2")[ppl] == "73.00 ± 3.00 ≈"
    assert _cells(md, "vptq", "4", "m3")[ppl] == "10.00 ≈" and _cells(md, "gptvq", "4", "m3")[ppl] == "10.50 ≈"
    assert _cells(md, "rtn", "4", "m3")[ppl] == "20.00"  # outside the best's noise: not tied, not ranked second
    assert "marked ≈ (tied)" in md
    assert r"$^{\approx}$" in (tmp_path / "results.tex").read_text()


def test_variants_labelled_and_published_numbers_beside_matching_rows(tmp_path):
    """A non-reference variant is labelled in the method column and never matched to a paper; a row matching a
    paper's (model, method, bits, dataset, seqlen, finetuning) shows the published value and the difference."""
    papers = tmp_path / "papers.csv"
    papers.write_text(
        "model,method,bits,dataset,seqlen,finetuned,value,metric,paper,arxiv,table,note\n"
        "m,vptq,2.02,wikitext2,2048,none,7.00,ppl,Hand (2026),0000.00000,Table 1,hand-made for the test\n"
        "m,vptq,2.02,wikitext2,2048,e2e,6.00,ppl,Hand (2026),0000.00000,Table 2,finetuned: must not match\n"
        "m,gptvq,2.25,wikitext2,2048,none,9.00,ppl,Hand (2026),0000.00000,Table 1,2.25 b: too far from 2\n")
    cmp = {"finetune": "none"}
    _run(tmp_path, "a", "vptq", 2.0, 2.05, 7.5, settings={"variant": "reference"}, comparison={**cmp, "variant": "reference"},
         format_version=2)
    _run(tmp_path, "b", "vptq", 2.0, 2.05, 7.2, settings={"variant": "scaled"}, comparison={**cmp, "variant": "scaled"},
         format_version=2)
    _run(tmp_path, "c", "gptvq", 2.0, 2.08, 8.0, comparison=cmp, format_version=2)
    write_report(str(tmp_path), papers=str(papers))
    md = (tmp_path / "results.md").read_text()
    cols = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    paper, delta = cols.index("paper PPL wikitext2 @2048"), cols.index("Δ vs paper")
    ref, ours, gv = _cells(md, "vptq", "2"), _cells(md, "vptq (scaled)", "2"), _cells(md, "gptvq", "2")
    assert ref[paper] == "7.00" and ref[delta] == "+0.50"
    assert ours[paper] == "—" and gv[paper] == "—"
    assert "Hand (2026), Table 1 (2.02 b)" in md and "NOT the published algorithm" in md


def test_times_measured_beside_other_work_are_marked_and_not_ranked(tmp_path):
    """A quantization time is ranked only when the ranked rows ran on the same threads on a quiet
    machine (metrics.json time.other_cpu_cores below 0.25 cores): otherwise every time is shown,
    none bold, the busy rows marked ‡, and a note says why."""
    def env(t):
        return {"env": {"threads": {"intra_op": t}}}

    _run(tmp_path, "a", "gptq", 2.0, 2.06, 12.0, qtime=30.0, **env(1))
    _run(tmp_path, "b", "vptq", 2.0, 2.10, 7.5, qtime=60.0, **env(1))
    for d in ("a", "b"):  # quiet: ranked
        m = json.loads((tmp_path / d / "metrics.json").read_text())
        m["time"]["other_cpu_cores"] = 0.02
        (tmp_path / d / "metrics.json").write_text(json.dumps(m))
    write_report(str(tmp_path))
    md = (tmp_path / "results.md").read_text()
    qt = [c.strip() for c in md.splitlines()[2].strip("|").split("|")].index("quant time (s) ↓")
    assert _cells(md, "gptq", "2")[qt] == "**30.0**" and "Quantization times are shown but not ranked" not in md

    _run(tmp_path, "c", "aqlm", 2.0, 2.05, 9.0, qtime=20.0, **env(1))
    m = json.loads((tmp_path / "c" / "metrics.json").read_text())
    m["time"]["other_cpu_cores"] = 1.1  # another lane kept a core busy
    (tmp_path / "c" / "metrics.json").write_text(json.dumps(m))
    write_report(str(tmp_path))
    md = (tmp_path / "results.md").read_text()
    assert _cells(md, "aqlm", "2")[qt] == "20.0 ‡" and _cells(md, "gptq", "2")[qt] == "30.0"
    assert "not ranked: 1 row(s) were quantized beside other work" in md
    assert r"$^\ddagger$" in (tmp_path / "results_paper.tex").read_text()

    _run(tmp_path, "d", "rtn", 2.0, 2.09, 99.0, qtime=1.0, **env(2))  # other threads, no record of the machine
    write_report(str(tmp_path))
    md = (tmp_path / "results.md").read_text()
    assert "different thread counts (1, 2" in md and "1 row(s) carry no record" in md
    assert "threads" in [c.strip() for c in md.splitlines()[2].strip("|").split("|")]

    _run(tmp_path, "e", "vptq", 3.0, 3.04, 6.0, qtime=5.0, cost={"blocks_reused": 30}, **env(1))  # blocks loaded
    write_report(str(tmp_path))
    md = (tmp_path / "results.md").read_text()
    qt = [c.strip() for c in md.splitlines()[2].strip("|").split("|")].index("quant time (s) ↓")
    assert _cells(md, "vptq", "3")[qt] == "5.0 ↺" and "1 row(s) loaded quantized blocks" in md


def test_rows_that_differ_in_finetuning_settings_say_how(tmp_path):
    """Two e2e runs of one method that differ in their finetuning settings (learning rate, windows) are two
    rows, and a `finetuning settings` column (shown only where rows differ in it) tells them apart; a row
    without a finetuning record (a method's own block finetuning) shows none (—)."""
    e2e = {"mode": "e2e", "epochs": 4, "lr": 5e-4, "lr_min": 5e-5, "batch": 2, "norms": True, "patience": 1,
           "topk": 64, "train_windows": 28, "heldout_windows": 4}
    cmp = {"finetune": "e2e"}
    _run(tmp_path, "a", "vptq", 3.0, 3.04, 29.7, finetune=e2e, comparison=cmp, format_version=2, config_key="A")
    _run(tmp_path, "b", "vptq", 3.0, 3.04, 28.6, finetune={**e2e, "train_windows": 112, "heldout_windows": 16},
         comparison=cmp, format_version=2, config_key="B")
    _run(tmp_path, "c", "gptq", 3.0, 3.10, 40.0, finetune={**e2e, "lr": 1e-3, "lr_min": None, "topk": None,
                                                            "patience": 2, "norms": False},
         comparison=cmp, format_version=2, config_key="C")
    _run(tmp_path, "d", "aqlm", 3.0, 3.05, 70.0, comparison={"finetune": "layer"}, format_version=2, config_key="D")
    write_report(str(tmp_path))
    md = (tmp_path / "results.md").read_text()
    col = [c.strip() for c in md.splitlines()[2].strip("|").split("|")].index("finetuning settings")
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in md.splitlines() if ln.startswith("| m |")]
    got = sorted(r[col] for r in rows if r[1] == "vptq")
    assert got == ["e2e: ≤4 epochs, lr 0.0005→5e-05, batch 2, 128 windows",
                   "e2e: ≤4 epochs, lr 0.0005→5e-05, batch 2, 32 windows"]
    assert _cells(md, "gptq", "3")[col] == ("e2e: ≤4 epochs, lr 0.001, batch 2, 32 windows, patience 2, "
                                            "whole vocabulary, norms frozen")
    assert _cells(md, "aqlm", "3")[col] == "—"  # the table's mark for a missing value


def test_ppl_ratio_to_the_float_model_shown_beside_ppl_with_its_spread_and_not_ranked(tmp_path):
    """Runs that scored KL record their PPL / the float model's on the same windows: a column right of the
    PPL's, mean ± std over seeds, never bold (the PPL column ranks the same order)."""
    for i, (p, r) in enumerate([(40.0, 1.6), (42.0, 1.68), (44.0, 1.76)]):
        _run(tmp_path, f"e{i}", "vptq", 2.0, 2.05, p, seed=i, config_key="A",
             kld={"wikitext2": {"mean": 0.5, "mean_se": 0.01, "top1_agree": 60.0, "ppl_ratio": r}})
    _run(tmp_path, "n", "vptq", 2.0, 2.05, 60.0, seed=0, config_key="B",
         kld={"wikitext2": {"mean": 0.8, "mean_se": 0.01, "top1_agree": 50.0, "ppl_ratio": 2.4}})
    write_report(str(tmp_path))
    md = (tmp_path / "results.md").read_text()
    cols = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    ppl, ratio = cols.index("PPL wikitext2 @2048 ↓"), cols.index("PPL ÷ float wikitext2")
    assert ratio == ppl + 1
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in md.splitlines() if ln.startswith("| m | vptq")]
    assert sorted(r[ratio] for r in rows) == ["1.680 ± 0.080", "2.400"]  # std over (1.6, 1.68, 1.76); no bold
    assert "PPL ÷ float:" in md


def test_runs_from_different_machines_are_named_and_their_times_not_ranked(tmp_path):
    """Two CPUs with one marketing name (a VM's "AMD EPYC": Zen 3 and Zen 4) are told apart by the family
    and model metrics.json records (env.cpu): the table gets a machine column, a note says that bitwise
    reproducibility holds per machine, and quantization times are not ranked across them."""
    from analysis.collect import machine_of

    def env(model_number):
        return {"env": {"threads": {"intra_op": 2}, "device": "cpu (AMD EPYC, 2 cores)",
                        "cpu": {"model": "AMD EPYC", "family": "25", "model_number": model_number}}}

    _run(tmp_path, "a", "gptq", 2.0, 2.06, 12.0, qtime=30.0, **env("1"))
    _run(tmp_path, "b", "vptq", 2.0, 2.10, 7.5, qtime=60.0, **env("1"))
    write_report(str(tmp_path))
    md = (tmp_path / "results.md").read_text()
    assert "machine" not in [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    assert "come from" not in md and "different machines" not in md

    _run(tmp_path, "c", "rtn", 2.0, 2.09, 99.0, qtime=1.0, **env("17"))
    write_report(str(tmp_path))
    md = (tmp_path / "results.md").read_text()
    head = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    assert _cells(md, "rtn", "2")[head.index("machine")] == "AMD EPYC (family 25 model 17)"
    assert _cells(md, "gptq", "2")[head.index("machine")] == "AMD EPYC (family 25 model 1)"
    assert "The runs come from 2 machines (AMD EPYC (family 25 model 1); AMD EPYC (family 25 model 17)" in md
    assert "not ranked: the rows ran on 2 different machines" in md
    assert "**" not in _cells(md, "rtn", "2")[head.index("quant time (s) ↓")]

    assert machine_of({"gpu": {"name": "NVIDIA H200"}, "cpu": {"model": "x"}}) == "NVIDIA H200"
    assert machine_of({"cpu": {"model": "AMD EPYC"}, "device": "cpu (AMD EPYC, 2 cores)"}) == "AMD EPYC"
    assert machine_of({"device": "cpu (Intel, 8 cores)"}) == "cpu (Intel, 8 cores)"  # older records
    assert machine_of(None) is None


def test_decode_throughput_shown_never_ranked(tmp_path):
    """Where kernel.throughput measured decode, the table shows tok/s per row (the float reference's too)
    with a note, and never bolds one: a single timing per run has no known noise."""
    rb = {"model_bytes": 100 * 2 ** 20, "kernel_buffer_bytes": 2 ** 19}
    _run(tmp_path, "f", "fp16", None, 16.0, 13.4, kernel={"name": "cpu", "decode_tok_s": 17.0})
    _run(tmp_path, "a", "vptq", 2.0, 2.07, 34.0, kernel={"name": "cpu", "decode_tok_s": 32.1, "resident_bytes": rb})
    _run(tmp_path, "b", "gptq", 2.0, 2.10, 60.0, kernel={"name": "cpu", "decode_tok_s": 29.9})
    write_report(str(tmp_path))
    md = (tmp_path / "results.md").read_text()
    head = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    col = head.index("decode tok/s ↑")
    assert _cells(md, "vptq", "2")[col] == "32.1" and _cells(md, "gptq", "2")[col] == "29.9"
    assert _cells(md, "fp16", "—")[col] == "17.0"
    assert "decode tok/s: greedy decode at batch 1" in md
    mib = head.index("decode MiB ↓")  # kernel.resident_bytes, where recorded: model + kernel buffers
    assert _cells(md, "vptq", "2")[mib] == "100.5" and "**" not in _cells(md, "vptq", "2")[mib]
    assert _cells(md, "gptq", "2")[mib] == "—"  # not measured
    assert "decode MiB: the memory the decoding model held" in md

    for d in ("f", "a", "b"):  # no throughput measured: no column, no note
        m = json.loads((tmp_path / d / "metrics.json").read_text())
        m["kernel"] = {"name": "cpu"}
        (tmp_path / d / "metrics.json").write_text(json.dumps(m))
    write_report(str(tmp_path))
    md = (tmp_path / "results.md").read_text()
    assert "decode tok/s" not in md and "decode MiB" not in md
