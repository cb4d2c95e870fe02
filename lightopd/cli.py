"""Command-line interface: a typer app whose options are generated from the stage configs.

Each command's options, defaults and help come from its config dataclass (config.py) and, for
`train`, the objectives' parameter dataclasses; nothing is restated here. A command builds its
config, calls the stage's run(), and prints one JSON line on stdout. Progress and logs go to
stderr. Exit codes: 0 success, 2 bad input or usage (one message, no traceback), 1 internal
error. Stages, torch and transformers are imported only when a command runs, so `--help` is fast.
"""

from __future__ import annotations

import inspect
import json
import sys
import textwrap
from collections.abc import Callable
from typing import Annotated, Any, Optional

import typer

from lightopd import __version__
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
from lightopd.errors import InputError, TrainingError, full_disk
from lightopd.merge_config import MergeConfig
from lightopd.objectives import OBJECTIVES
from lightopd.objectives.base import SHARED
from lightopd.options import Option, build, describe, flag_of, metavar, options
from lightopd.panels import PanelledCommand, panel, rank
from lightopd.progress import console
from lightopd.rounds_config import RoundsConfig

app = typer.Typer(
    name="lightopd",
    help="Offline on-policy distillation: rollout -> score-teacher -> train -> eval, each a store on disk.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)
GIVEN = ("COMMANDLINE", "ENVIRONMENT")  # click's ParameterSource names (typer vendors its own click)


def _emit(result: dict) -> None:
    """The command's one JSON line: standard JSON, a number that is not finite written as null."""
    from lightopd.data.fields import finite

    sys.stdout.write(json.dumps(finite(result), allow_nan=False) + "\n")
    sys.stdout.flush()


def _parameter(o: Option, required: bool) -> inspect.Parameter:
    kind = o.kind if (not o.optional and (required or o.default is not None)) else Optional[o.kind]
    if o.repeatable:  # a tuple of strings: the flag is given once per item
        kind = Optional[list[str]]
    group = panel(o.key, o.path)
    if o.doc.argument:
        info = typer.Argument(help=describe(o), metavar=metavar(o), show_default=False, rich_help_panel=group)
    elif o.kind is bool and o.default is True:  # on by default: a flag that turns it off
        info = typer.Option(f"{o.flag}/--no-{o.flag[2:]}", help=f"{describe(o)} [default: True]", show_default=False,
                            rich_help_panel=group)
    else:
        info = typer.Option(o.flag, help=describe(o), metavar=metavar(o), rich_help_panel=group)
    default = inspect.Parameter.empty if required else (None if o.required or o.repeatable else o.default)
    return inspect.Parameter(o.key, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, info])


def command(name: str, cls: type, doc: str, epilog: str | None = None, extra: tuple[inspect.Parameter, ...] = (),
            optional: tuple[str, ...] = ()) -> Callable:
    """Register `name` with one option per CLI field of `cls` (plus `extra`); the decorated handler
    gets (values of every option, the subset given explicitly on the command line)."""
    cli_options = sorted((o for o in options(cls) if o.doc.cli),
                         key=lambda o: (not o.required, rank(o.key, o.path), o.doc.at_end))

    def register(handler: Callable[[dict, dict], None]) -> Callable:
        def run(ctx: typer.Context, **values: Any) -> None:
            values = {k: () if v is None and k in repeated else v for k, v in values.items()}  # not given: none
            given = {k: v for k, v in values.items() if ctx.get_parameter_source(k).name in GIVEN}
            handler(values, given)

        repeated = {o.key for o in cli_options if o.repeatable}
        params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
        params += [_parameter(o, o.required and o.key not in optional) for o in cli_options]
        run.__signature__ = inspect.Signature([*params, *extra])
        run.__doc__ = doc
        short = " ".join(doc.split("\n\n")[0].split())  # the first paragraph, whole, in `lightopd --help`
        app.command(name, epilog=epilog, short_help=short, cls=PanelledCommand)(run)
        return handler

    return register


def _extra(name: str, kind: Any, info: Any, default: Any = None) -> inspect.Parameter:
    info.rich_help_panel = panel(name)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, info])


def _version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Offline on-policy distillation: each command writes a store on disk for the next."""


@command("rollout", RolloutConfig, """Sample a model on a prompt source into a sharded rollout store.

Each row holds the prompt and completion token ids and the log-prob of every sampled token under
exactly the distribution sampled from (this temperature and top-p; never the model's own
generation defaults). An interrupted run resumes where it stopped when re-run with the same
options; a complete store is left as it is.""")
def _rollout(values: dict, given: dict) -> None:
    from lightopd.stages import rollout

    _emit(rollout.run(build(RolloutConfig, values)))


@command("score-teacher", ScoreConfig, """Run the teacher once over a rollout store and write a teacher store.

Per completion token: the teacher's log-prob of the sampled token (exact, float32, also outside
the top-k), its top-k ids and log-probs, and its full-vocabulary entropy. Re-running skips
finished shards; --worker I/N splits the work between processes.""")
def _score(values: dict, given: dict) -> None:
    from lightopd.stages import score

    _emit(score.run(build(ScoreConfig, values)))


def _objectives_epilog() -> str:
    lines = ["Objectives (--objective NAME). Parameters: --set objective.KEY=VALUE or a recipe's [objective] "
             "table; every objective also takes temperature (τ), the student's softmax temperature: by default "
             "the store's sampling temperature (1 for a greedy store), and 1 for sft; and the row weights from "
             "outcome rewards, composable with any objective: row_weight none/paced (paced: each row weighted by "
             "p^paced_alpha (1 − p)^paced_beta, p its prompt's pass rate: PACED, arXiv 2603.11178; paced_alpha "
             "1, paced_beta 1) and reward_gate (the objective's signal only on rows whose reward is at least this: "
             "KEPO's quality gate, arXiv 2602.00400)."]
    for name, objective in OBJECTIVES.items():
        block = ["\b", f"{name}: {objective.summary}"]
        for o in options(objective.Params):
            if o.key in SHARED:
                continue
            text = f"{o.key.rstrip('_')} ({o.default}): {describe(o)}"
            block += textwrap.wrap(text, 100, initial_indent="    ", subsequent_indent="      ")
        lines.append("\n".join(block))
    return "\n\n".join(lines)


def _recipe_help() -> str:
    from lightopd.layering import shipped_recipes

    return ("A TOML recipe: a file, or the name of a shipped one (" + ", ".join(sorted(shipped_recipes()))
            + "). Its [train] table sets training keys, its [objective] table the name and parameters. "
              "Layers: defaults < recipe < --set < explicit flags.")


@command("train", TrainConfig, """Train a student on a store, with no teacher in memory.

Streams the store's shards through a seeded shuffle buffer, packs micro-batches by a token
budget and accumulates gradients so the loss is the mean over the step's completion tokens.
Writes OUT/metrics.jsonl (one line per step), checkpoints under OUT/checkpoints/step-N, and the
final model in OUT. An OPD objective checks teacher consistency first. Data parallel under
torchrun (`torchrun --nproc-per-node N -m lightopd train ...`): each rank reads its own parts of
the store and gradients are all-reduced (DDP, or FSDP2 with --fsdp); rank 0 writes. See
docs/scaling.md.""", epilog=_objectives_epilog(), extra=(
    _extra("recipe", Optional[str], typer.Option("--recipe", metavar="FILE|NAME", help=_recipe_help())),
    _extra("set_", Optional[list[str]], typer.Option(
        "--set", metavar="KEY=VALUE",
        help="Set a training key or objective.KEY (repeatable), e.g. --set lr=1e-6 --set objective.beta=0.3; keys "
             "are the options' names, with _ for -.")),
))
def _train(values: dict, given: dict) -> None:
    from lightopd.layering import load_recipe, parse_set, train_settings
    from lightopd.stages import train

    recipe = given.pop("recipe", None)
    sets = [parse_set(item) for item in given.pop("set_", None) or []]
    cfg, params = train_settings(given, None if recipe is None else load_recipe(recipe), sets)
    result = train.run(cfg, params)
    if result is not None:  # None on ranks other than 0 under torchrun
        _emit(result)


@command("eval", EvalConfig, """Measure a model: accuracy on verifiable answers (accuracy, pass@k, majority vote,
completion length, truncation rate) and agreement with a teacher store. Or, with --compare, show
saved results side by side.""", optional=("model", "prompts"), extra=(
    _extra("results", Optional[list[str]], typer.Argument(
        help="With --compare: eval result files (JSON) to show side by side.", metavar="RESULT.json",
        show_default=False)),
    _extra("compare", bool, typer.Option("--compare", help="Compare saved eval results instead of evaluating."),
           False),
    _extra("plot", Optional[str], typer.Option(
        "--plot", metavar="PNG", help="With --compare: also write a PNG bar chart of accuracy, pass@k, majority "
                                      "accuracy, truncation rate and top-1 agreement (needs matplotlib: pip install "
                                      "'lightopd[plot]').")),
))
def _eval(values: dict, given: dict) -> None:
    from lightopd.stages import evaluate

    results, plot = values.pop("results"), values.pop("plot")
    if values.pop("compare"):
        if not results:
            raise InputError("--compare: give the eval result files to compare")
        ignored = next((key for key in given if key not in ("results", "compare", "plot")), None)
        if ignored is not None:
            raise InputError(f"{flag_of(ignored)}: not used with --compare, which only reads saved results")
        _emit(evaluate.compare(results, plot))
        return
    if plot is not None:
        raise InputError("--plot: only with --compare (it charts saved results)")
    if results:
        raise InputError(f"unexpected argument {results[0]} (files are only taken with --compare)")
    if values["model"] is None:
        raise InputError("--model: required (unless --compare)")
    _emit(evaluate.run(build(EvalConfig, values)))


@command("prompts", PromptsConfig, """Write a prompt file (JSONL) from a reasoning-gym task or another prompt source.

`lightopd prompts reasoning-gym:chain_sum --n 1000 --seed 0 --out p.jsonl` draws 1000 records of
a reasoning-gym task (question, answer, metadata; check them with `eval --checker reasoning-gym`).
From a file or a Hugging Face dataset, records are written with the fields lightopd recognises
(id, prompt or messages, answer) after the field mapping, and every other field kept beside them.""")
def _prompts(values: dict, given: dict) -> None:
    from lightopd.stages import prompts

    _emit(prompts.run(build(PromptsConfig, values)))


@command("reward", RewardConfig, """Score a store's completions again with another checker, into a new store.

Same rows, a new reward column: each completion decoded (special tokens left out) and scored by
--checker against its row's answer and metadata, exactly as rollout scores it; rows without an
answer keep a null reward. For a checker changed after sampling, without sampling again.""")
def _reward(values: dict, given: dict) -> None:
    from lightopd.stages import reward

    _emit(reward.run(build(RewardConfig, values)))


@command("inspect", InspectConfig, "Describe a store: format, fingerprints, parameters, shards, rows, tokens, "
                                   "bytes per token; with --verify, check it; with --show N, print N rows decoded; "
                                   "with --stats, what its columns hold.")
def _inspect(values: dict, given: dict) -> None:
    from lightopd.stages import inspect_store

    result, ok = inspect_store.run(build(InspectConfig, values))
    _emit(result)
    if not ok:
        raise typer.Exit(2)


@command("rounds", RoundsConfig, """Sample, score and train round after round: offline OPD refreshed on drift.

Round r rolls out the current student (round r−1's), the teacher scores the rollouts once, and
the student trains on them for --steps-per-round steps, or until --refresh-when's metric says the
store has gone stale; then the next round samples the new student. One round is Lightning OPD's
offline recipe; a round per step is on-policy. Everything stays under OUT/round-r/ (rollouts,
teacher-store, student, and with --heldout the check's stores), usable by the other commands;
OUT/rounds.jsonl has a line per round (steps, tokens sampled, scored and trained, the last step's
drift measures, held-out accuracy and KL to the teacher). Killed and re-run with the same
options, it goes on where it stopped.""", extra=(
    _extra("set_", Optional[list[str]], typer.Option(
        "--set", metavar="KEY=VALUE",
        help="A training key or objective.KEY for every round's training (repeatable), e.g. --set objective.beta=0.3 "
             "--set schedule=cosine; the options of this command set their own keys.")),
))
def _rounds(values: dict, given: dict) -> None:
    from lightopd.layering import parse_set
    from lightopd.stages import rounds

    sets = [parse_set(item) for item in values.pop("set_", None) or []]
    result = rounds.run(build(RoundsConfig, values), sets)
    if result is not None:  # None on ranks other than 0 under torchrun
        _emit(result)


@command("merge", MergeConfig, """Fold a LoRA adapter into its base model and write a plain transformers model.""")
def _merge(values: dict, given: dict) -> None:
    from lightopd.stages import merge

    _emit(merge.run(build(MergeConfig, values)))


@command("demo", DemoConfig, """Run the Lightning OPD recipe end to end on a bundled task, in minutes on a laptop CPU.

The task is 3-digit addition, which the bundled teacher (398k parameters) solves worked (the sum's
digits from the last, `|`, the sum) or direct (`|`, the sum). It writes the SFT data; a 1-layer
student is SFT-trained on it, rolled out, scored by the teacher once, and trained offline with an
OPD objective, beside a control that spends those steps on more SFT. base, SFT, SFT-more, OPD and
the teacher answer held-out pairs (one sample each at T = 1): a table of accuracy and each
format's share and accuracy, and the result as JSON on stdout (also OUT/demo.json).""")
def _demo(values: dict, given: dict) -> None:
    from lightopd.stages import demo

    _emit(demo.run(build(DemoConfig, values)))


def command_line() -> Any:
    """The click command behind `app`; positional arguments show their metavar alone in --help (typer
    would add the Python type, e.g. `<list[str]>`)."""
    from typer.core import TyperArgument

    group = typer.main.get_command(app)
    for sub in group.commands.values():
        for param in sub.params:
            if isinstance(param, TyperArgument):
                param.display_type_rich = lambda ctx: None
                param._usage_display_name = lambda p=param: (p.metavar if p.required else f"[{p.metavar}]") + (
                    "..." if p.nargs != 1 else "")
    return group


def main() -> None:
    """Console entry point; click handles usage errors (exit 2) and --help, we handle InputError."""
    from lightopd.memory import release_freed_memory

    release_freed_memory()
    try:
        command_line()(prog_name="lightopd")
    except (InputError, TrainingError) as e:
        _fail(str(e), 2 if isinstance(e, InputError) else 1)
    except Exception as e:
        disk = full_disk(e)
        if disk is None:
            raise
        _fail(f"{disk} while writing; what was complete before is kept (temporary files are removed): free "
              "space or raise the limit, then re-run the same command (train: with --resume)", 1)


def _fail(message: str, code: int) -> None:
    from rich.text import Text

    console.quiet = False  # under torchrun other ranks are quiet, but their errors are not
    console.print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)
    sys.exit(code)
