"""One source for every option: configs, the generated CLI and its help, and train's layering of
defaults < recipe < --set < explicit flags."""

from __future__ import annotations

import pytest

from lightopd import objectives as O
from lightopd.cli import command_line
from lightopd.config import (
    EvalConfig,
    InspectConfig,
    PromptsConfig,
    RewardConfig,
    RolloutConfig,
    ScoreConfig,
    TrainConfig,
)
from lightopd.demo_config import DemoConfig
from lightopd.errors import InputError
from lightopd.layering import load_recipe, shipped_recipes, train_settings
from lightopd.objectives.base import SHARED
from lightopd.options import flatten, options
from tests.helpers import do_rollout, do_score, last_json, metrics, run_cli

BASE = {"student": "s", "data": "d", "out": "o"}
COMMANDS = {"rollout": RolloutConfig, "score-teacher": ScoreConfig, "train": TrainConfig, "eval": EvalConfig,
            "inspect": InspectConfig, "demo": DemoConfig, "prompts": PromptsConfig, "reward": RewardConfig}


def help_text(command: str) -> str:
    import click
    from click.testing import CliRunner

    result = CliRunner().invoke(command_line(), [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return click.unstyle(result.output)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_every_option_with_its_default_and_doc(command):
    text = " ".join(help_text(command).split())
    for o in options(COMMANDS[command]):
        if not o.doc.cli:
            continue
        shown = o.key.upper() if o.doc.argument else o.flag
        assert shown in text or (o.doc.metavar and o.doc.metavar in text), (command, o.key)
        assert " ".join(o.doc.help.split())[:40] in text, (command, o.key)
        if not o.required and o.default not in (None, False, ()):
            assert f"[default: {o.default}]" in text, (command, o.key)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_groups_every_option(command):
    """Options in named groups, the main inputs first; only --help left under "Other options"."""
    from lightopd.panels import MAIN, ORDER, OTHER

    text = help_text(command)
    groups = [line[:-1] for line in text.splitlines() if line.endswith(":") and line[:1].isupper()]
    assert groups[0] == MAIN and groups[-1] == OTHER
    assert groups == sorted(groups, key=ORDER.index)  # most used first, the same order in every command
    other = text[text.index(f"{OTHER}:"):].split("\n\n")[0]
    assert [line.split()[0] for line in other.splitlines()[1:] if line.startswith("  -")] == ["--help"]


def test_top_level_help_shows_each_commands_summary_whole():
    from click.testing import CliRunner

    output = CliRunner().invoke(command_line(), ["--help"], terminal_width=100).output
    text = " ".join(output[output.index("Commands:"):].split())
    assert "..." not in text
    assert "with --stats, what its columns hold." in text  # inspect's summary, to its end


def test_train_help_lists_every_objective_and_parameter():
    text = help_text("train")
    for name, objective in O.OBJECTIVES.items():
        assert f"{name}: {objective.summary}" in text
        for o in options(objective.Params):
            if o.key not in SHARED:
                assert f"{o.key.rstrip('_')} ({o.default})" in text, (name, o.key)
    flat = " ".join(text.split())
    for key in SHARED:  # described once, for every objective
        assert key in flat, key
    for recipe in shipped_recipes():
        assert recipe in text


def test_shared_parts_are_the_same_options_in_every_command():
    """--temperature, --device, ... are one declaration: the same help in rollout and eval."""
    def docs(cls):
        return {o.key: o.doc for o in options(cls)}

    rollout, evaluate, score = docs(RolloutConfig), docs(EvalConfig), docs(ScoreConfig)
    source = ("split", "subset", "prompt_field", "messages_field", "answer_field", "id_field")
    for key in ("n", "temperature", "top_p", "max_new_tokens", "seed", "generation_batch_size", "device", "dtype",
                "trust_remote_code", "chat", "system_prompt", "chat_template_kwargs", "max_prompt_tokens",
                "long_prompts", *source):
        assert rollout[key] == evaluate[key], key
    for key in source:
        assert docs(PromptsConfig)[key] == rollout[key], key
    for key in ("device", "dtype", "trust_remote_code", "worker"):
        assert rollout[key] == score[key], key
    assert docs(TrainConfig)["device"] == docs(DemoConfig)["device"]


def test_flat_keys_round_trip():
    cfg = RolloutConfig.of(model="m", prompts="p", out="o", n=3, temperature=0.6, device="cpu", answer_field="gold")
    assert cfg.model.path == "m" and cfg.sampling.n == 3 and cfg.model.device == "cpu"
    assert cfg.prompts.source == "p" and cfg.prompts.answer_field == "gold"
    assert RolloutConfig.of(**flatten(cfg)) == cfg
    no_prompts = EvalConfig.of(model="m", data="d")  # a nested part left out is None, and round-trips
    assert no_prompts.prompts is None and EvalConfig.of(**flatten(no_prompts)) == no_prompts
    with pytest.raises(InputError, match="--answer-field: only with --prompts"):
        EvalConfig.of(model="m", data="d", answer_field="gold")


def test_layers_apply_in_order():
    recipe = {"train": {"lr": 1e-6, "steps": 7, "warmup_steps": 2}, "objective": {"name": "jsd", "beta": 0.2}}
    cfg, params = train_settings(BASE, recipe)
    assert (cfg.lr, cfg.steps, cfg.warmup_steps, cfg.objective, params.beta) == (1e-6, 7, 2, "jsd", 0.2)
    cfg, params = train_settings(BASE, recipe, [("lr", 2e-6), ("objective.beta", 0.7)])
    assert (cfg.lr, cfg.steps, params.beta) == (2e-6, 7, 0.7)
    cfg, params = train_settings({**BASE, "lr": 3e-6, "steps": 50}, recipe, [("lr", 2e-6)])
    assert (cfg.lr, cfg.steps, cfg.warmup_steps, params.beta) == (3e-6, 50, 2, 0.2)


def test_steps_and_epochs_replace_each_other_across_layers():
    recipe = {"train": {"epochs": 2.0}}
    cfg, _ = train_settings({**BASE, "steps": 3}, recipe)
    assert (cfg.steps, cfg.epochs) == (3, None)
    cfg, _ = train_settings(BASE, {"train": {"steps": 9}}, [("epochs", 1.5)])
    assert (cfg.steps, cfg.epochs) == (None, 1.5)
    with pytest.raises(InputError, match="steps and epochs both given"):
        train_settings(BASE, {"train": {"steps": 9, "epochs": 1.0}})


def test_a_recipe_for_another_objective_keeps_its_training_keys_only(capsys):
    cfg, params = train_settings({**BASE, "objective": "rkl"}, load_recipe("gkd-jsd"))
    assert cfg.objective == "rkl" and cfg.steps == 150 and not hasattr(params, "beta")
    assert "parameters are for jsd, not rkl" in capsys.readouterr().err


def test_recipes_by_name_or_path(tmp_path):
    assert load_recipe("lightning-opd") == load_recipe(str(shipped_recipes()["lightning-opd"]))
    assert load_recipe("sft.toml")["train"]["schedule"] == "cosine"
    with pytest.raises(InputError, match="no shipped recipe of that name .shipped: g-opd, gkd-jsd"):
        load_recipe("nope")
    with pytest.raises(InputError, match="no such file"):
        load_recipe(str(tmp_path / "missing.toml"))


def test_objective_requirements_reach_the_demo_config():
    with pytest.raises(InputError, match="--opd-samples: must be >= 2 for opd-seq .its loo baseline"):
        DemoConfig.of(opd_samples=1)
    assert DemoConfig.of(objective="lightning-opd", opd_samples=1).opd_samples == 1
    with pytest.raises(InputError, match=r"sft is the SFT-more control"):
        DemoConfig.of(objective="sft")
    with pytest.raises(InputError, match="--opd-samples: must be >= 2 for grpo"):
        DemoConfig.of(objective="grpo", opd_samples=1)


@pytest.mark.slow
def test_cli_recipe_with_a_steps_flag_runs(tiny_model, rollout_store, tmp_path):
    """Flags override the recipe (--steps 3 replaces its epochs = 1) and --set (--lr over lr=1e-4)."""
    out = tmp_path / "sft"
    result = last_json(run_cli("train", "--student", str(tiny_model), "--data", str(rollout_store), "--out", str(out),
                               "--recipe", "recipes/sft.toml", "--steps", "3", "--set", "batch_size=4",
                               "--set", "lr=1e-4", "--lr", "2e-4"))
    assert result["steps"] == 3 and result["objective"] == "sft"
    assert [m["lr"] for m in metrics(out)] == pytest.approx([2e-4 * f for f in (0.1, 0.2, 0.3)])
    assert all(m["rows"] == 4 for m in metrics(out))


@pytest.mark.slow
def test_opd_seq_refuses_a_store_with_one_sample_per_prompt(tiny_model, teacher_model, prompts_file, tmp_path):
    do_rollout(tiny_model, prompts_file, tmp_path / "r", n=1, max_new_tokens=4)
    do_score(teacher_model, tmp_path / "r", tmp_path / "t", top_k=4)
    args = ["train", "--student", str(tiny_model), "--data", str(tmp_path / "t"), "--objective", "opd-seq",
            "--steps", "1", "--batch-size", "2", "--allow-teacher-mismatch"]
    proc = run_cli(*args, "--out", str(tmp_path / "a"), check=False)
    assert proc.returncode == 2 and "holds 1 sample(s) per prompt" in proc.stderr and "--n 2" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "a").exists()
    run_cli(*args, "--out", str(tmp_path / "b"), "--set", "objective.baseline=none")
