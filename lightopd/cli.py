"""Command-line interface: parse options, call a stage's run(), print one JSON line on stdout.

Progress and logs go to stderr. Exit codes: 0 success, 2 bad input or usage (one message, no
traceback), 1 internal error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer import Option

from lightopd import __version__
from lightopd.config import (
    DEVICES,
    DTYPES,
    SCHEDULES,
    TOPK_DTYPES,
    DemoConfig,
    EvalConfig,
    RolloutConfig,
    ScoreConfig,
    TrainConfig,
)
from lightopd.errors import InputError, TrainingError
from lightopd.progress import console

app = typer.Typer(
    name="lightopd",
    help="Offline on-policy distillation: rollout -> score-teacher -> train -> eval, each a store on disk.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)

R = RolloutConfig  # class attributes hold the defaults
S = ScoreConfig
T = TrainConfig
E = EvalConfig
D = DemoConfig


def _emit(result: dict) -> None:
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def _version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Offline on-policy distillation: each command writes a store on disk for the next."""


@app.command()
def rollout(
    model: Annotated[Path, Option(
        help="Model to sample: a local Hugging Face causal-LM directory (safetensors weights).")],
    prompts: Annotated[Path, Option(
        help="Prompt file, .jsonl or .parquet: records with `prompt` or `messages`, optional `id` and `answer`.")],
    out: Annotated[Path, Option(
        help="Directory of the rollout store to write (or to resume, if it holds an unfinished one).")],
    n: Annotated[int, Option(help="Samples per prompt.")] = R.n,
    max_new_tokens: Annotated[int, Option(
        help="Most tokens to generate per sample (fewer if the model's context ends first).")] = R.max_new_tokens,
    temperature: Annotated[float, Option(help="Sampling temperature; 0 is greedy decoding.")] = R.temperature,
    top_p: Annotated[float, Option(
        help="Nucleus sampling: draw from the smallest set of most likely tokens holding this much "
             "probability; 1 disables it.")] = R.top_p,
    seed: Annotated[int, Option(
        help="Seed of every sample's random stream: the same seed and inputs give the same rollouts, "
             "whatever the batch size.")] = R.seed,
    limit: Annotated[Optional[int], Option(help="Use only the first N prompt records.")] = R.limit,
    batch_size: Annotated[int, Option(
        help="Sequences decoded together; prompts are grouped by length. Lower it if memory runs out.")] = R.batch_size,
    prompts_per_shard: Annotated[int, Option(
        help="Prompts per Parquet shard, the unit of resumption.")] = R.prompts_per_shard,
    worker: Annotated[str, Option(
        help="I/N: write only shards i with i % N == I, so N processes (on one machine or many sharing a "
             "filesystem) fill one store together; rows do not depend on the split.")] = R.worker,
    device: Annotated[str, Option(
        help=f"Device: {', '.join(DEVICES)} or cuda:N; auto picks CUDA when available.")] = R.device,
    dtype: Annotated[str, Option(
        help=f"Weight dtype: {', '.join(DTYPES)}; auto is bfloat16 on CUDA, float32 elsewhere.")] = R.dtype,
    trust_remote_code: Annotated[bool, Option(
        "--trust-remote-code", help="Allow Python code shipped inside the model directory to run.")] = False,
) -> None:
    """Sample a model on a prompt file into a sharded rollout store.

    Each row holds the prompt and completion token ids and the log-prob of every sampled token
    under exactly the distribution sampled from (this temperature and top-p; never the model's
    own generation defaults). An interrupted run resumes where it stopped when re-run with the
    same options; a complete store is left as it is. `--worker I/N` splits the shards between
    processes (one per GPU, or the tasks of a job array) that fill one store together.
    """
    from lightopd import rollout as stage

    cfg = RolloutConfig(
        model=str(model), prompts=str(prompts), out=str(out), n=n, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, seed=seed, limit=limit, batch_size=batch_size,
        prompts_per_shard=prompts_per_shard, worker=worker, device=device, dtype=dtype,
        trust_remote_code=trust_remote_code,
    )
    _emit(stage.run(cfg))


@app.command("score-teacher")
def score_teacher(
    teacher: Annotated[Path, Option(
        help="Teacher model: a local Hugging Face causal-LM directory with the rollouts' vocabulary.")],
    rollouts: Annotated[Path, Option(help="A complete rollout store (from `lightopd rollout`).")],
    out: Annotated[Path, Option(
        help="Directory of the teacher store to write (or to resume, or to share with other workers).")],
    top_k: Annotated[int, Option(help="Teacher log-probs stored per position: its k most likely tokens.")] = S.top_k,
    temperature: Annotated[float, Option(
        help="Scoring temperature: statistics are of softmax(logits / temperature).")] = S.temperature,
    worker: Annotated[str, Option(
        help="I/N: score only shards i with i % N == I, so N processes (on one machine or many sharing a "
             "filesystem) fill one store together.")] = S.worker,
    max_batch_tokens: Annotated[int, Option(
        help="Padded tokens per forward pass; rows are sorted by length and packed to this budget.")]
    = S.max_batch_tokens,
    topk_dtype: Annotated[str, Option(
        help=f"Storage dtype of top-k log-probs: {', '.join(TOPK_DTYPES)} (float16 halves the store; its "
             "rounding is documented in the README).")] = S.topk_dtype,
    device: Annotated[str, Option(
        help=f"Device: {', '.join(DEVICES)} or cuda:N; auto picks CUDA when available.")] = S.device,
    dtype: Annotated[str, Option(
        help=f"Teacher weight dtype: {', '.join(DTYPES)}; auto is bfloat16 on CUDA, float32 elsewhere.")]
    = S.dtype,
    trust_remote_code: Annotated[bool, Option(
        "--trust-remote-code", help="Allow Python code shipped inside the model directory to run.")] = False,
) -> None:
    """Run the teacher once over a rollout store and write a teacher store.

    Per completion token: the teacher's log-prob of the sampled token (exact, float32, also
    outside the top-k), its top-k ids and log-probs, and its full-vocabulary entropy. Re-running
    skips finished shards; `--worker I/N` splits the work between processes.
    """
    from lightopd import score as stage

    cfg = ScoreConfig(
        teacher=str(teacher), rollouts=str(rollouts), out=str(out), top_k=top_k, temperature=temperature,
        worker=worker, max_batch_tokens=max_batch_tokens, topk_dtype=topk_dtype, device=device, dtype=dtype,
        trust_remote_code=trust_remote_code,
    )
    _emit(stage.run(cfg))


def _objectives_help() -> str:
    from lightopd.objectives import OBJECTIVES

    return ", ".join(OBJECTIVES)


@app.command()
def train(
    student: Annotated[Path, Option(help="Student to train: a local Hugging Face causal-LM directory.")],
    data: Annotated[Path, Option(
        help="A teacher store (from score-teacher), or a rollout store for --objective sft.")],
    out: Annotated[Path, Option(
        help="Output directory: the final model (HF format + lightopd.json), checkpoints/step-N/, metrics.jsonl.")],
    objective: Annotated[Optional[str], Option(
        help=f"Loss, one of: {_objectives_help()}. [default: {T.objective}]")] = None,
    recipe: Annotated[Optional[Path], Option(
        help="TOML recipe: a [train] table of training keys and an [objective] table (name and parameters); "
             "see recipes/.")] = None,
    set_: Annotated[Optional[list[str]], Option(
        "--set", metavar="KEY=VALUE",
        help="Override one key, e.g. --set lr=1e-6 or --set objective.beta=0.5 (repeatable; applied last).")]
    = None,
    steps: Annotated[Optional[int], Option(help="Optimizer steps. [default: one epoch]")] = None,
    epochs: Annotated[Optional[float], Option(help="Passes over the store (instead of --steps).")] = None,
    batch_size: Annotated[Optional[int], Option(
        help=f"Sequences per optimizer step; whole prompt groups are kept together. [default: {T.batch_size}]")]
    = None,
    micro_batch_tokens: Annotated[Optional[int], Option(
        help="Padded tokens per forward/backward; gradients accumulate over the step's micro-batches. "
             f"[default: {T.micro_batch_tokens}]")] = None,
    lr: Annotated[Optional[float], Option(help=f"Peak learning rate (AdamW). [default: {T.lr}]")] = None,
    schedule: Annotated[Optional[str], Option(
        help=f"Learning-rate schedule after warmup: {', '.join(SCHEDULES)}. [default: {T.schedule}]")] = None,
    warmup_steps: Annotated[Optional[int], Option(
        help=f"Linear warmup steps. [default: {T.warmup_steps}]")] = None,
    weight_decay: Annotated[Optional[float], Option(
        help=f"AdamW weight decay (not on norms and biases). [default: {T.weight_decay}]")] = None,
    grad_clip: Annotated[Optional[float], Option(
        help=f"Max gradient norm; 0 disables clipping. [default: {T.grad_clip}]")] = None,
    seed: Annotated[Optional[int], Option(help=f"Seed of the data shuffle and of torch. [default: {T.seed}]")]
    = None,
    save_every: Annotated[Optional[int], Option(
        help=f"Write a resumable checkpoint every N steps (0: none). [default: {T.save_every}]")] = None,
    resume: Annotated[bool, Option("--resume", help="Continue from the newest checkpoint in --out.")] = False,
    sft_teacher: Annotated[Optional[Path], Option(
        help="Declare the model that wrote the student's SFT data, when the student has no lightopd.json.")] = None,
    allow_teacher_mismatch: Annotated[bool, Option(
        "--allow-teacher-mismatch",
        help="Train even if the scoring teacher is not the student's SFT teacher (a warning instead of an error).")]
    = False,
    fsdp: Annotated[bool, Option(
        "--fsdp", help="Under torchrun: shard the student's weights, gradients and optimizer state over the ranks "
                       "(FSDP2) instead of a full copy per rank (DDP). For students too large for one GPU.")] = False,
    device: Annotated[Optional[str], Option(
        help=f"Device: {', '.join(DEVICES)} or cuda:N. [default: {T.device}]")] = None,
    dtype: Annotated[Optional[str], Option(
        help=f"Compute dtype: {', '.join(DTYPES)}; auto is bfloat16 autocast on CUDA (weights and optimizer stay "
             f"float32), float32 elsewhere. [default: {T.dtype}]")] = None,
    trust_remote_code: Annotated[bool, Option(
        "--trust-remote-code", help="Allow Python code shipped inside the model directory to run.")] = False,
) -> None:
    """Train a student on a store, with no teacher in memory.

    Streams the store's shards through a seeded shuffle buffer, packs micro-batches by a token
    budget and accumulates gradients so the loss is the mean over the step's completion tokens.
    Writes OUT/metrics.jsonl (one line per step), checkpoints under OUT/checkpoints/step-N, and
    the final model in OUT. An OPD objective checks teacher consistency first.

    Data parallel under torchrun (`torchrun --nproc-per-node N -m lightopd train ...`): each
    rank reads its own parts of the store and gradients are all-reduced (DDP, or FSDP2 with
    --fsdp); rank 0 writes. See docs/scaling.md.
    """
    import tomllib

    from lightopd import train as stage
    from lightopd.config import build_train_config, parse_set

    recipe_table = None
    if recipe is not None:
        try:
            recipe_table = tomllib.loads(Path(recipe).read_text())
        except OSError as e:
            raise InputError(f"--recipe {recipe}: cannot read ({e.strerror})") from None
        except tomllib.TOMLDecodeError as e:
            raise InputError(f"--recipe {recipe}: not valid TOML ({e})") from None
    base = dict(student=str(student), data=str(data), out=str(out), objective=objective, steps=steps, epochs=epochs,
                batch_size=batch_size, micro_batch_tokens=micro_batch_tokens, lr=lr, schedule=schedule,
                warmup_steps=warmup_steps, weight_decay=weight_decay, grad_clip=grad_clip, seed=seed,
                save_every=save_every, resume=resume or None,
                sft_teacher=None if sft_teacher is None else str(sft_teacher),
                allow_teacher_mismatch=allow_teacher_mismatch or None, fsdp=fsdp or None, device=device, dtype=dtype,
                trust_remote_code=trust_remote_code or None)
    cfg, params = build_train_config(base, recipe_table, [parse_set(item) for item in set_ or []])
    result = stage.run(cfg, params)
    if result is not None:  # None on ranks other than 0 under torchrun
        _emit(result)


@app.command("eval")
def evaluate(
    results: Annotated[Optional[list[Path]], typer.Argument(
        help="With --compare: eval result files (JSON) to show side by side.", show_default=False)] = None,
    compare: Annotated[bool, Option("--compare", help="Compare saved eval results instead of evaluating.")] = False,
    plot: Annotated[Optional[Path], Option(
        help="With --compare: also write a PNG bar chart of accuracy, pass@k, majority accuracy, truncation rate "
             "and top-1 agreement (needs matplotlib: pip install 'lightopd[plot]').")] = None,
    model: Annotated[Optional[Path], Option(help="Model to evaluate: a local Hugging Face causal-LM directory.")]
    = None,
    prompts: Annotated[Optional[Path], Option(
        help="Prompt file (.jsonl or .parquet) whose records all have an `answer`.")] = None,
    teacher_store: Annotated[Optional[Path], Option(
        help="Also measure agreement with this teacher store's teacher on its rows: tail-bucket rkl and fkl, "
             "k1, top-1 agreement (token means).")] = None,
    out: Annotated[Optional[Path], Option(help="Write the result JSON here too.")] = None,
    n: Annotated[int, Option(help="Samples per prompt (pass@k is reported for k up to n).")] = E.n,
    temperature: Annotated[float, Option(help="Sampling temperature; 0 is greedy.")] = E.temperature,
    top_p: Annotated[float, Option(help="Nucleus sampling mass; 1 disables it.")] = E.top_p,
    max_new_tokens: Annotated[int, Option(help="Most tokens generated per sample.")] = E.max_new_tokens,
    seed: Annotated[int, Option(help="Seed of the samples' random streams.")] = E.seed,
    limit: Annotated[Optional[int], Option(help="Use only the first N prompt records.")] = E.limit,
    checker: Annotated[str, Option(
        help="How answers are compared: auto (math when the answer is a number or the text has \\boxed{}), "
             "exact (white-space-folded string), math (last \\boxed{} or last number, compared by value).")]
    = E.checker,
    batch_size: Annotated[int, Option(help="Sequences sampled together.")] = E.batch_size,
    device: Annotated[str, Option(help=f"Device: {', '.join(DEVICES)} or cuda:N.")] = E.device,
    dtype: Annotated[str, Option(help=f"Weight dtype: {', '.join(DTYPES)}.")] = E.dtype,
    trust_remote_code: Annotated[bool, Option(
        "--trust-remote-code", help="Allow Python code shipped inside the model directory to run.")] = False,
) -> None:
    """Measure a model: accuracy on verifiable answers (accuracy, pass@k, majority vote, completion
    length, truncation rate) and agreement with a teacher store. Or, with --compare, show saved
    results side by side."""
    from lightopd import evaluate as stage

    if compare:
        if not results:
            raise InputError("--compare: give the eval result files to compare")
        _emit(stage.compare([str(p) for p in results], None if plot is None else str(plot)))
        return
    if plot is not None:
        raise InputError("--plot: only with --compare (it charts saved results)")
    if results:
        raise InputError(f"unexpected argument {results[0]} (files are only taken with --compare)")
    if model is None:
        raise InputError("--model: required (unless --compare)")
    cfg = EvalConfig(
        model=str(model), prompts=None if prompts is None else str(prompts),
        teacher_store=None if teacher_store is None else str(teacher_store), out=None if out is None else str(out),
        n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, limit=limit,
        checker=checker, batch_size=batch_size, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
    )
    _emit(stage.run(cfg))


@app.command()
def demo(
    out: Annotated[Path, Option(help="Directory for every prompt file, store and model of the run (must be new).")]
    = Path(D.out),
    seed: Annotated[int, Option(help="Seed of the student's initialisation, the prompts, sampling and data order.")]
    = D.seed,
    objective: Annotated[str, Option(help="The OPD objective of step 5.")] = D.objective,
    sft_prompts: Annotated[int, Option(help="Train prompts the teacher answers once each: the SFT data.")]
    = D.sft_prompts,
    sft_steps: Annotated[int, Option(help="SFT steps.")] = D.sft_steps,
    opd_prompts: Annotated[int, Option(help="Train prompts the SFT student answers --opd-samples times.")]
    = D.opd_prompts,
    opd_samples: Annotated[int, Option(help="Samples per OPD prompt.")] = D.opd_samples,
    opd_steps: Annotated[int, Option(help="OPD steps, and the steps of the SFT-more control.")] = D.opd_steps,
    heldout_prompts: Annotated[int, Option(help="Held-out prompts for the evaluation.")] = D.heldout_prompts,
    device: Annotated[str, Option(help=f"Device: {', '.join(DEVICES)} or cuda:N.")] = D.device,
) -> None:
    """Run the Lightning OPD recipe end to end on a bundled task, in minutes on a laptop CPU.

    The task is 3-digit addition. The bundled teacher (398k parameters) solves it in two
    formats: worked (the sum's digits from the last, `|`, the sum) or direct (`|`, the sum).
    The teacher writes the SFT data; a 1-layer student is SFT-trained on it, rolled out and
    scored by the teacher once; then it trains offline with an OPD objective, next to a control
    that spends the same steps on more SFT. base, SFT, SFT-more, OPD and the teacher answer
    held-out pairs (one sample each at T = 1): accuracy, and each solution format's share and
    accuracy. Prints a table, and the result as JSON on stdout (also OUT/demo.json).
    """
    from lightopd import demo as stage

    cfg = DemoConfig(out=str(out), seed=seed, objective=objective, sft_prompts=sft_prompts, sft_steps=sft_steps,
                     opd_prompts=opd_prompts, opd_samples=opd_samples, opd_steps=opd_steps,
                     heldout_prompts=heldout_prompts, device=device)
    _emit(stage.run(cfg))


@app.command()
def inspect(
    store: Annotated[Path, typer.Argument(help="A store directory (holding manifest.json).")],
    verify: Annotated[bool, Option(
        "--verify", help="Check every shard's checksum and row count; exit 2 naming any shard that is "
                         "missing, partial or corrupt.")] = False,
) -> None:
    """Describe a store: format, fingerprints, parameters, shards, rows, tokens, bytes per token."""
    from lightopd.inspect import run as inspect_run

    result, ok = inspect_run(store, verify)
    _emit(result)
    if not ok:
        raise typer.Exit(2)


def main() -> None:
    """Console entry point; click handles usage errors (exit 2) and --help, we handle InputError."""
    from lightopd.memory import release_freed_memory

    release_freed_memory()
    try:
        app()
    except (InputError, TrainingError) as e:
        from rich.text import Text

        console.quiet = False  # under torchrun other ranks are quiet, but their errors are not
        console.print(Text("error: ", style="bold red") + Text(str(e)), soft_wrap=True)
        sys.exit(2 if isinstance(e, InputError) else 1)
