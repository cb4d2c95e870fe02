"""Command-line interface: parse options, call a stage's run(), print one JSON line on stdout.

Progress and logs go to stderr. Exit codes: 0 success, 2 bad input or usage (one message, no
traceback), 1 internal error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from lightopd import __version__
from lightopd.config import DEVICES, DTYPES, RolloutConfig
from lightopd.errors import InputError
from lightopd.progress import console

app = typer.Typer(
    name="lightopd",
    help="Offline on-policy distillation: rollout -> score-teacher -> train -> eval, each a store on disk.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

R = RolloutConfig  # class attributes hold the defaults


def _emit(result: dict) -> None:
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def _version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    pass


@app.command()
def rollout(
    model: Path = typer.Option(..., help="Model to sample: a local Hugging Face causal-LM directory (safetensors weights)."),
    prompts: Path = typer.Option(..., help="Prompt file, .jsonl or .parquet; records with `prompt` or `messages`, optional `id` and `answer`."),
    out: Path = typer.Option(..., help="Directory of the rollout store to write (or to resume, if it holds an unfinished one)."),
    n: int = typer.Option(R.n, help="Samples per prompt."),
    max_new_tokens: int = typer.Option(R.max_new_tokens, help="Most tokens to generate per sample (fewer if the model's context ends first)."),
    temperature: float = typer.Option(R.temperature, help="Sampling temperature; 0 is greedy decoding."),
    top_p: float = typer.Option(R.top_p, help="Nucleus sampling: sample from the smallest set of tokens holding this much probability; 1 disables it."),
    seed: int = typer.Option(R.seed, help="Seed of every sample's random stream; same seed and inputs give the same rollouts."),
    limit: Optional[int] = typer.Option(R.limit, help="Use only the first N prompt records."),
    batch_size: int = typer.Option(R.batch_size, help="Sequences decoded together; prompts are grouped by length. Lower it if memory runs out."),
    prompts_per_shard: int = typer.Option(R.prompts_per_shard, help="Prompts per Parquet shard (the unit of resumption)."),
    device: str = typer.Option(R.device, help=f"Device: {', '.join(DEVICES)} or cuda:N; auto picks CUDA when available."),
    dtype: str = typer.Option(R.dtype, help=f"Weight dtype: {', '.join(DTYPES)}; auto is bfloat16 on CUDA, float32 on CPU."),
    trust_remote_code: bool = typer.Option(R.trust_remote_code, help="Allow model code shipped inside the model directory to run."),
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


@app.command()
def inspect(
    store: Path = typer.Argument(..., help="A store directory (holding manifest.json)."),
    verify: bool = typer.Option(False, "--verify", help="Check every shard's checksum and row count; exit 2 naming any shard that is missing, partial or corrupt."),
) -> None:
    """Describe a store: format, model and tokenizer fingerprints, parameters, shards, rows, tokens, bytes per token."""
    from lightopd.inspect import run as inspect_run

    result, ok = inspect_run(store, verify)
    _emit(result)
    if not ok:
        raise typer.Exit(2)


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except InputError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, markup=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(130)
    except Exception as e:  # click's own usage errors carry their exit code (2)
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise
    sys.exit(code if isinstance(code, int) else 0)
