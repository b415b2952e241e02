"""Every config in conf/ composes; typos fail at compose time; bad choices give one line."""
from __future__ import annotations

import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from runners.cli import GROUPS, argv_errors, group_choices, register_resolvers
from runners.schema import register_configs
from tests.helpers import REPO, run_cli

CONF = os.path.join(REPO, "conf")
register_configs()
register_resolvers()

ALL = [(g, c) for g in GROUPS for c in group_choices(g)]


@pytest.mark.parametrize("group,choice", ALL, ids=[f"{g}={c}" for g, c in ALL])
def test_every_config_composes(group, choice):
    prefix = "+" if group == "experiment" else ""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"{prefix}{group}={choice}"])
    c = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert c["model"]["name"] and c["method"]["name"] and c["eval"]["seqlen"] >= 2
    if group in ("model", "method", "data", "logger", "kernel"):
        assert c[group]["name"] == choice or group == "model"


def test_typo_fails_at_compose():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        with pytest.raises(ConfigCompositionException):
            compose(config_name="config", overrides=["model.pathh=x"])
        with pytest.raises(ConfigCompositionException):
            compose(config_name="config", overrides=["eval.seqlen=abc"])


def test_contract_overrides_compose():
    ov = ["model=tiny_llama", "method=rtn", "bits=3", "kernel=torch", "data=text", "data.path=/tmp",
          "eval.seqlen=128", "eval.max_windows=4", "logger=none", "seed=7", "save.quantized=false"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=ov)
    assert (cfg.bits, cfg.seed, cfg.eval.seqlen, cfg.data.path) == (3.0, 7, 128, "/tmp")


@pytest.mark.parametrize("arg,needle", [
    ("model=llama9", "unknown model 'llama9'; valid choices: "),
    ("method=vpqt", "unknown method 'vpqt'"),
    ("data=wiki", "unknown data 'wiki'"),
    ("logger=tensorboard", "unknown logger 'tensorboard'"),
    ("method=fp16,rtnn", "unknown method 'rtnn'"),
    ("bits=0", "bits=0 must be a positive number"),
    ("bits=-2", "bits=-2 must be a positive"),
    ("bits=two", "bits='two' is not a number"),
])
def test_bad_choices_are_one_line(arg, needle):
    errs = argv_errors([arg])
    assert len(errs) == 1 and needle in errs[0] and "\n" not in errs[0]
    if arg.startswith(("model", "method", "data", "logger")):
        group = arg.split("=")[0]
        for c in group_choices(group):  # names every valid choice
            assert c in errs[0]


@pytest.mark.slow
def test_bad_choice_cli_exits_with_one_line(tmp_path):
    r = run_cli(["model=llama9", f"hydra.run.dir={tmp_path}"])
    assert r.returncode == 2
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: unknown model 'llama9'")
    assert not list(tmp_path.glob("**/metrics.json"))
