"""The declarative CLI: the `whymatch train` options come from the config dataclasses (help, choices, defaults), the
options given are told apart from defaults (argparse.SUPPRESS), and each command builds only its own options."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest

from whymatch import cli
from whymatch.attributes.train import SANEConfig
from whymatch.cli import train_avsl, train_mining, train_sane
from whymatch.train import AVSLConfig, MiningConfig, published_avsl_recipe

TASKS = [("mining", MiningConfig, train_mining), ("avsl", AVSLConfig, train_avsl), ("sane", SANEConfig, train_sane)]


class _Built(Exception):
    pass


@pytest.fixture
def built(monkeypatch):
    """Parse a `whymatch train ...` command line and run it up to the config it would train: argv -> config."""
    got = []

    def capture(train_fn, cfg, *args, **kwargs):
        got.append(cfg)
        raise _Built

    for _, _, module in TASKS:
        monkeypatch.setattr(module, "_run_training", capture)

    def run(argv):
        got.clear()
        args = cli.build_parser(argv).parse_args(argv)
        with pytest.raises(_Built):
            args.func(args)
        return got[0]
    return run


def _help(task: str) -> str:
    argv = ["train", task, "--data", "shapesworld", "--out", "o"]
    return cli.build_parser(argv).parse_args(argv)._parser.format_help()


@pytest.mark.parametrize("task, config, module", TASKS, ids=[t[0] for t in TASKS])
def test_defaults_are_the_configs(task, config, module, built, tmp_path):
    cfg = built(["train", task, "--data", "shapesworld", "--out", str(tmp_path)])
    assert cfg == config(data="shapesworld", out=str(tmp_path))


@pytest.mark.parametrize("task, config, module", TASKS, ids=[t[0] for t in TASKS])
def test_every_option_is_a_field_with_its_help_and_choices(task, config, module):
    fields = [f for f in dataclasses.fields(config) if "help" in f.metadata]
    text = _help(task)
    flags = set(re.findall(r"^  (--[a-z-]+)", text, flags=re.M)) - {"--help"}
    assert flags == {f.metadata.get("option", "--" + f.name.replace("_", "-")) for f in fields}
    flat = " ".join(text.split())
    for f in fields:
        meta = f.metadata
        if "choices" in meta:
            assert "{" + ",".join(meta["choices"]) + "}" in flat, f.name
        if meta["help"] and "%(default)s" in meta["help"]:
            before = meta["help"].split("%(default)s")[0].split()[-1]  # the word before the default
            assert f"{before} {f.default}" in flat, f.name


def test_switches_and_values_reach_the_config(built, tmp_path):
    cfg = built(["train", "mining", "--data", "shapesworld", "--out", str(tmp_path), "--no-flip", "--quiet",
                 "--no-mining", "--gamma", "2", "--loss", "margin", "--milestones", "2,4", "--scheduler", "step"])
    assert (cfg.flip, cfg.show_progress, cfg.mining, cfg.gamma, cfg.loss, cfg.milestones) == \
        (False, False, False, 2.0, "margin", (2, 4))
    cfg = built(["train", "avsl", "--data", "shapesworld", "--out", str(tmp_path), "--level-weights", "1,0.5,2",
                 "--no-proxy"])
    assert cfg.level_weights == (1.0, 0.5, 2.0) and cfg.use_proxy is False


def test_recipe_keeps_the_options_given_even_at_their_default(built, tmp_path):
    recipe = published_avsl_recipe("shapesworld")
    default_p = AVSLConfig().batch_p
    assert recipe["batch_p"] != default_p  # else the case below shows nothing
    base = ["train", "avsl", "--data", "shapesworld", "--out", str(tmp_path), "--recipe", "published"]
    cfg = built(base)
    assert cfg.batch_p == recipe["batch_p"] and cfg.recipe == "published"
    cfg = built([*base, "--batch-p", str(default_p)])  # given explicitly, the default value wins over the recipe
    assert cfg.batch_p == default_p and cfg.batch_k == recipe["batch_k"]


def test_each_command_builds_only_its_own_options():
    code = ("import sys\nfrom whymatch import cli\ncli.build_parser(['explain', 'q.png'])\n"
            "print(sorted(m for m in ('whymatch.train', 'whymatch.attributes') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_method_help_lists_the_registry(capsys):
    from whymatch.saliency.registry import method_names

    assert cli.main(["explain", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert ", ".join(method_names()) in text


def test_explainer_options_come_from_the_registry():
    """demo/explain add one option per registered CLI option, with its range, and the options reach the job."""
    from whymatch.cli.common import _settings
    from whymatch.saliency.registry import cli_options

    argv = ["demo", "--out", "o", "--both-images", "--progress", "--lime-samples", "7", "--seed", "3",
            "--window", str(cli.MAX_IMAGE_SIDE)]
    s = _settings(cli.build_parser(argv).parse_args(argv))
    assert (s.fixed_reference, s.show_progress, s.lime_samples, s.seed, s.window) == \
        (False, True, 7, 3, cli.MAX_IMAGE_SIDE)
    text = cli.build_parser(["demo"]).parse_args(["demo"])._parser.format_help()
    assert set(re.findall(r"^  (--[a-z-]+)", text, flags=re.M)) >= {o.flag for o in cli_options()}
    for bad in (["--window", str(cli.MAX_IMAGE_SIDE + 1)], ["--seed", "-1"], ["--seed", str(2**32)]):
        with pytest.raises(SystemExit):
            cli.build_parser(["demo"]).parse_args(["demo", *bad])
