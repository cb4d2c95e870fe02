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
from lightopd.config import DEVICES, DTYPES, TOPK_DTYPES, RolloutConfig, ScoreConfig
from lightopd.errors import InputError
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
    same options; a complete store is left as it is.
    """
    from lightopd import rollout as stage

    cfg = RolloutConfig(
        model=str(model), prompts=str(prompts), out=str(out), n=n, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, seed=seed, limit=limit, batch_size=batch_size,
        prompts_per_shard=prompts_per_shard, device=device, dtype=dtype,
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
    except InputError as e:
        from rich.text import Text

        console.print(Text("error: ", style="bold red") + Text(str(e)), soft_wrap=True)
        sys.exit(2)
