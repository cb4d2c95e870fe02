"""The configuration of every command: one dataclass per stage, composed of shared parts.

Each option is declared once, here (or, for objective parameters, beside its loss), with its
default and help text (`options.opt`); the command line is generated from these declarations
and each dataclass validates itself, so a bad value is reported before any work starts.
The shared parts (specs.py): `ModelSpec` (a model and how to run it), `SamplingSpec` (n,
temperature, top-p, max new tokens, seed) and `SourceSpec` and `RenderSpec` (a prompt source and its field mapping;
chat rendering and prompt length), composed by the stages that load a model, sample one or read
prompts, and single options used by several stages (`--limit`, `--worker`, ...). `train` adds
recipes and `--set` (layering.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightopd.data.encoding import StoreEncoding
from lightopd.objectives.selection import SelectionSpec
from lightopd.options import MIN_TEMPERATURE, build, check, opt, parse_worker
from lightopd.specs import (
    CheckerSpec,
    ContextSpec,
    EngineSpec,
    ModelSpec,
    RenderSpec,
    SamplingSpec,
    SourceSpec,
    generation_batch_size_option,
    kv_cache_tokens_option,
    limit_option,
    micro_batch_tokens_option,
    worker_option,
)
from lightopd.stopping import stop_rule

SCHEDULES = ("constant", "linear", "cosine")
FLOAT32_MAX = 3.4028234663852886e38


class Config:
    """Mixin of the stage configs: `Stage.of(key=value, ...)` builds one from flat option keys."""

    @classmethod
    def of(cls, **values: Any):
        return build(cls, values)


# ---- the stages ----

@dataclass(frozen=True, kw_only=True)
class RolloutConfig(Config):
    """`lightopd rollout`: sample a model on a prompt file into a rollout store."""

    model: ModelSpec = opt(help="The model to sample.")
    prompts: SourceSpec = opt(help="The prompts to sample.")
    render: RenderSpec = opt(RenderSpec())
    out: str = opt(help="Directory of the rollout store to write (or to resume, if it holds an unfinished one).",
                   metavar="DIR")
    sampling: SamplingSpec = opt(SamplingSpec())
    engine: EngineSpec = opt(EngineSpec())
    checking: CheckerSpec = opt(CheckerSpec())  # each row's reward
    limit: int | None = limit_option()
    generation_batch_size: int = generation_batch_size_option()
    kv_cache_tokens: int | None = kv_cache_tokens_option()
    prompts_per_shard: int = opt(256, "Prompts per Parquet shard, the unit of resumption.", metavar="N")
    worker: str = worker_option()

    def __post_init__(self) -> None:
        check(self.limit is None or self.limit >= 1, "--limit", f"must be >= 1, got {self.limit}")
        check(self.generation_batch_size >= 1, "--generation-batch-size",
              f"must be >= 1, got {self.generation_batch_size}")
        check(self.kv_cache_tokens is None or self.kv_cache_tokens >= 1, "--kv-cache-tokens",
              f"must be >= 1, got {self.kv_cache_tokens}")
        check(self.prompts_per_shard >= 1, "--prompts-per-shard", f"must be >= 1, got {self.prompts_per_shard}")
        parse_worker(self.worker)


@dataclass(frozen=True, kw_only=True)
class ScoreConfig(Config):
    """`lightopd score-teacher`: the teacher's log-probs over a rollout store, into a teacher store."""

    teacher: ModelSpec = opt(help="The teacher, with the rollouts' vocabulary.")
    data: str = opt(help="A complete rollout store (from `lightopd rollout`).", metavar="DIR")
    out: str = opt(help="Directory of the teacher store to write (or to resume, or to share with other workers).",
                   metavar="DIR")
    context: ContextSpec = opt(ContextSpec())
    where: tuple[str, ...] = opt((), "Score only the rows whose metadata field FIELD holds one of the VALUES "
                                     "(repeatable: every --where must hold): routes a mixed rollout store to "
                                     "several teachers, each scoring its own rows into its own store; train "
                                     "takes them together with --data A --data B. [default: every row]",
                                 metavar="FIELD=VALUE[,VALUE]")
    teacher_name: str | None = opt(None, "The teacher's name in the store and in train's per-teacher metrics "
                                         "(teacher_token_frac/NAME). [default: the --teacher directory's name, or "
                                         "a Hub id's repository name]",
                                   metavar="NAME")
    reference: str | None = opt(None, "Also store a reference model's log-prob of each sampled token "
                                      "(reference_logprobs), e.g. the student's base for g-opd's reward "
                                      "extrapolation (objective.reference=scored): scored beside the teacher, on the "
                                      "student's prompt at the rollouts' sampling temperature, in the teacher's dtype "
                                      "on its device (--engine hf).", metavar="MODEL")
    top_k: int = opt(32, "Teacher log-probs stored per position: its k most likely tokens.", metavar="K")
    temperature: float = opt(1.0, "Scoring temperature: every statistic is of softmax(logits / temperature).",
                             metavar="T")
    worker: str = worker_option()
    engine: EngineSpec = opt(EngineSpec())
    micro_batch_tokens: int = micro_batch_tokens_option(8192, " (no gradients, so larger than train's)")
    encoding: StoreEncoding = opt(StoreEncoding())
    chunk_elements: int = opt(1 << 23, "Logit entries reduced at once (bounds the float32 scratch).", cli=False)

    def __post_init__(self) -> None:
        check(self.top_k >= 1, "--top-k", f"must be >= 1, got {self.top_k}")
        check(self.temperature >= MIN_TEMPERATURE, "--temperature",
              f"must be at least {MIN_TEMPERATURE}, got {self.temperature}")
        check(self.micro_batch_tokens >= 1, "--micro-batch-tokens", f"must be >= 1, got {self.micro_batch_tokens}")
        check(self.chunk_elements >= 1, "chunk_elements", f"must be >= 1, got {self.chunk_elements}")
        parse_worker(self.worker)
        check(self.teacher_name is None or (self.teacher_name.strip() and "/" not in self.teacher_name),
              "--teacher-name", f"must be a non-empty name without '/', got {self.teacher_name!r}")


PACKING = ("auto", "on", "off")
LOSS_CHUNK_TOKENS = 1024  # completion positions whose logits are reduced at once (train's default, eval's too)
REPORT_TO = ("tensorboard", "wandb", "trackio", "mlflow")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(Config):
    """`lightopd train`: fit a student on a store. Objective parameters live beside each objective."""

    student: ModelSpec = opt(help="The student to train.")
    data: tuple[str, ...] = opt(help="A teacher store (from score-teacher), or a rollout store for --objective sft. "
                                     "Repeatable: teacher stores of several teachers routed over the same "
                                     "rollouts (score-teacher --where), or rollout stores of several teachers "
                                     "for an SFT mixture, read as one.", metavar="DIR")
    out: str = opt(help="Output directory: the final model (HF format + lightopd.json), checkpoints/step-N/ and "
                        "metrics.jsonl.", metavar="DIR")
    objective: str = opt("lightning-opd", "The loss (listed below).", metavar="NAME")
    selection: SelectionSpec = opt(SelectionSpec())  # which tokens teach, for every objective
    steps: int | None = opt(None, "Optimizer steps. [default: one epoch]", metavar="N")
    epochs: float | None = opt(None, "Passes over the store, instead of --steps.", metavar="E")
    batch_size: int = opt(16, "Sequences per optimizer step over all ranks; a prompt's samples stay together.",
                          metavar="N")
    micro_batch_tokens: int = opt(4096, "Tokens per forward pass; gradients accumulate over the step's "
                                         "micro-batches. Packed (see --packing), real tokens count; padded, padding "
                                         "counts too. A sequence longer than the budget gets a micro-batch of its "
                                         "own.", metavar="N")
    packing: str = opt("auto", "Padding-free micro-batches: sequences concatenated into one row whose position ids "
                               "restart at each sequence, so none attends to another (checked once against "
                               "separate forwards; a model that fails the check is padded, with a warning). auto: "
                               "packed with a variable-length attention kernel (--attn-implementation "
                               "flash_attention_2, flash_attention_3 or flex_attention), padded otherwise, since "
                               "sdpa and eager attend over the whole packed row under a mask (measured slower: "
                               "README).", choices=PACKING)
    loss_chunk_tokens: int = opt(LOSS_CHUNK_TOKENS,
                                 "Completion positions whose [positions × vocabulary] logits are computed at once in "
                                 "the loss; each chunk is differentiated and freed before the next, so the loss holds "
                                 "one chunk's float32 blocks whatever the sequence length.", metavar="N")
    gradient_checkpointing: bool = opt(False, "Activation checkpointing: keep only each decoder layer's input in "
                                              "forward and recompute the layer in backward (about a third more "
                                              "compute; a layer's saved activations shrink to one hidden vector "
                                              "per token).")
    report_to: str = opt("none", "Experiment trackers that get every step's metrics.jsonl numbers and the run's "
                                 "settings, comma-separated: tensorboard (OUT/tensorboard), wandb, trackio, mlflow, "
                                 "all (the installed ones) or none. Each is an optional extra (pip install "
                                 "'lightopd[tensorboard]') and works offline as usual (WANDB_MODE=offline).",
                         metavar="NAMES")
    lr: float = opt(1e-5, "Peak learning rate (AdamW).", metavar="LR")
    schedule: str = opt("constant", "Learning-rate schedule after warmup.", choices=SCHEDULES)
    warmup_steps: int = opt(0, "Linear warmup steps.", metavar="N")
    weight_decay: float = opt(0.0, "AdamW weight decay (not on norms and biases).", metavar="X")
    adam_beta1: float = opt(0.9, "AdamW β1.", metavar="X")
    adam_beta2: float = opt(0.999, "AdamW β2.", metavar="X")
    grad_clip: float = opt(1.0, "Max gradient norm; 0 disables clipping.", metavar="X")
    shuffle_buffer: int = opt(256, "Prompt groups held per data part for the seeded shuffle.", metavar="N")
    lora_rank: int = opt(0, "LoRA: train rank-R adapters on the student's linear layers instead of all its weights "
                            "(needs pip install 'lightopd[peft]'); 0 trains every weight.", metavar="R")
    lora_alpha: float | None = opt(None, "LoRA scale α (the update is α/R · BA). [default: 2R]", metavar="A")
    lora_dropout: float = opt(0.0, "Dropout on the adapters' input (only with --dropout: dropout is off in the "
                                   "training forward otherwise).", metavar="P")
    lora_target_modules: str | None = opt(None, "The layers that get adapters, names separated by commas "
                                                "(q_proj,v_proj). [default: all-linear, every linear layer of the "
                                                "decoder but not the output layer nor MoE routers]", metavar="NAMES")
    merge_lora: bool = opt(False, "Write the output with the adapters merged into full weights (a plain transformers "
                                  "model) instead of the adapter alone.")
    fsdp: bool = opt(False, "Under torchrun: shard weights, gradients and optimizer state (FSDP2) instead of a "
                            "full copy per rank (DDP). The student is built empty and rank 0 alone reads it (on the "
                            "CPU) to fill every rank's shards; below float32 (bfloat16 on CUDA) it computes in "
                            "--dtype over float32 shards. Works with --lora-rank.")
    seed: int = opt(0, "Seed of the data order and of torch.", metavar="S")
    save_every: int = opt(0, "Write a resumable checkpoint every N steps (0: only at the end).", metavar="N")
    keep_checkpoints: int | None = opt(None, "Keep only the newest N checkpoints (older ones are deleted once a "
                                             "new one is in place). [default: keep all]", metavar="N")
    resume: bool = opt(False, "Continue from the newest checkpoint in --out.")
    sft_teacher: str | None = opt(None, "Declare the model that wrote the student's SFT data, when the student has "
                                        "no lightopd.json.", metavar="DIR")
    allow_teacher_mismatch: bool = opt(False, "Train even if the scoring teacher is not the student's SFT teacher "
                                              "(a warning instead of an error).")
    allow_off_policy: bool = opt(False, "No warning when an objective that assumes the rollouts came from the "
                                        "student (or the model it was trained from) trains on another model's.")
    stop_when: str | None = opt(None, "End the run early, writing its final model, at the first step whose metric "
                                      "crosses: NAME<X or NAME>X with NAME a metrics.jsonl key, e.g. is_ess<0.8 or "
                                      "rollout_kl>0.02 (the store has gone stale: sample it again).",
                                metavar="NAME<X")
    stop_window: int = opt(1, "--stop-when reads the mean of its metric over the last N steps (a single noisy step "
                              "cannot cross it; it cannot end the run before step N).", metavar="N")
    teacher_weight: tuple[str, ...] = opt((), "With several teacher stores: weigh the loss of the rows a teacher "
                                              "scored by W (its name as in teacher_token_frac/NAME; repeatable). "
                                              "[default: 1 each]", metavar="NAME=W")
    allow_unrouted: bool = opt(False, "With teacher stores routed over the same rollouts: train on the routed rows "
                                      "even if some rows were scored by no teacher (an error otherwise).")
    dropout: bool = opt(False, "Keep the model's dropout in the training forward. Off by default: with it, the "
                               "student's log-probs are not its policy's, and ratios to the rollout policy are "
                               "not 1 even before the weights move.")

    def __post_init__(self) -> None:
        if isinstance(self.data, str):  # one store, as code and recipes may give it
            object.__setattr__(self, "data", (self.data,))
        check(bool(self.data), "--data", "give at least one store")
        stop_rule(self.stop_when)
        check(self.stop_window >= 1, "--stop-window", f"must be >= 1, got {self.stop_window}")
        check(self.steps is None or self.steps >= 1, "--steps", f"must be >= 1, got {self.steps}")
        check(self.epochs is None or self.epochs > 0, "--epochs", f"must be > 0, got {self.epochs}")
        check(self.steps is None or self.epochs is None, "--steps/--epochs", "give one of them, not both")
        check(self.batch_size >= 1, "--batch-size", f"must be >= 1, got {self.batch_size}")
        check(self.micro_batch_tokens >= 1, "--micro-batch-tokens", f"must be >= 1, got {self.micro_batch_tokens}")
        names = [n.strip() for n in self.report_to.split(",") if n.strip()]
        check(names in ([], ["none"], ["all"]) or all(n in REPORT_TO for n in names), "--report-to",
              f"must be none, all or trackers from {', '.join(REPORT_TO)} separated by commas, "
              f"got {self.report_to!r}")
        check(self.lora_rank >= 0, "--lora-rank", f"must be >= 0, got {self.lora_rank}")
        check(self.lora_alpha is None or self.lora_alpha > 0, "--lora-alpha", f"must be > 0, got {self.lora_alpha}")
        check(0 <= self.lora_dropout < 1, "--lora-dropout", f"must be in [0, 1), got {self.lora_dropout}")
        check(self.packing in PACKING, "--packing", f"must be one of {', '.join(PACKING)}, got {self.packing!r}")
        check(self.loss_chunk_tokens >= 1, "--loss-chunk-tokens", f"must be >= 1, got {self.loss_chunk_tokens}")
        check(self.lr > 0, "--lr", f"must be > 0, got {self.lr}")
        check(self.lr <= FLOAT32_MAX, "--lr", f"must be at most {FLOAT32_MAX:g} (the optimizer computes in float32), "
                                              f"got {self.lr:g}")
        check(self.schedule in SCHEDULES, "--schedule",
              f"must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        check(self.warmup_steps >= 0, "--warmup-steps", f"must be >= 0, got {self.warmup_steps}")
        check(self.weight_decay >= 0, "--weight-decay", f"must be >= 0, got {self.weight_decay}")
        check(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "--adam-beta1/--adam-beta2",
              f"must be in [0, 1), got {self.adam_beta1}, {self.adam_beta2}")
        check(self.grad_clip >= 0, "--grad-clip", f"must be >= 0, got {self.grad_clip}")
        check(self.shuffle_buffer >= 1, "--shuffle-buffer", f"must be >= 1, got {self.shuffle_buffer}")
        check(self.keep_checkpoints is None or self.keep_checkpoints >= 1, "--keep-checkpoints",
              f"must be >= 1, got {self.keep_checkpoints}")
        check(self.save_every >= 0, "--save-every", f"must be >= 0, got {self.save_every}")
        check(self.student.dtype != "float16", "--dtype",
              "float16 training needs loss scaling, which lightopd does not do; use bfloat16 (or float32)")


@dataclass(frozen=True, kw_only=True)
class EvalConfig(Config):
    """`lightopd eval`: verifiable accuracy on prompts with answers, and agreement with a teacher store."""

    model: ModelSpec = opt(help="The model to evaluate.")
    prompts: SourceSpec | None = opt(None, "Prompts to check answers on (every record needs a reference answer).")
    render: RenderSpec = opt(RenderSpec())
    data: str | None = opt(None, "A teacher store: also measure agreement with its teacher on its rows (tail-bucket "
                                 "rkl and fkl, k1, top-1 agreement; token means).", metavar="DIR")
    out: str | None = opt(None, "Also write the result JSON to this file.", metavar="FILE")
    group_by: str | None = opt(None, "Also score the prompts of each value of this metadata field apart (a "
                                     "reasoning-gym task's source_dataset, a dataset's subject), beside the overall "
                                     "score.", metavar="FIELD")
    log_samples: str | None = opt(None, "Also write every sample to this JSONL file: prompt id and text, sample index, "
                                        "completion text, the answer read from it, the reference, the verdict.",
                                  metavar="FILE")
    sampling: SamplingSpec = opt(SamplingSpec())
    engine: EngineSpec = opt(EngineSpec())
    limit: int | None = opt(None, "Use only the first N prompt records, and the rows of --data's first N prompts.",
                            metavar="N")
    checking: CheckerSpec = opt(CheckerSpec())
    generation_batch_size: int = generation_batch_size_option()
    kv_cache_tokens: int | None = kv_cache_tokens_option()
    micro_batch_tokens: int = micro_batch_tokens_option(4096, " of the teacher-agreement pass")

    def __post_init__(self) -> None:
        check(self.prompts is not None or self.data is not None, "--prompts/--data",
              "give prompts to check answers on, a teacher store to measure agreement with, or both")
        check(self.prompts is not None or self.render == RenderSpec(), "--chat/--system-prompt/...",
              "only with --prompts (they say how prompts are rendered)")
        check(self.prompts is not None or self.log_samples is None, "--log-samples", "only with --prompts")
        check(self.prompts is not None or self.group_by is None, "--group-by", "only with --prompts")
        check(self.limit is None or self.limit >= 1, "--limit", f"must be >= 1, got {self.limit}")
        check(self.generation_batch_size >= 1, "--generation-batch-size",
              f"must be >= 1, got {self.generation_batch_size}")
        check(self.kv_cache_tokens is None or self.kv_cache_tokens >= 1, "--kv-cache-tokens",
              f"must be >= 1, got {self.kv_cache_tokens}")
        check(self.micro_batch_tokens >= 1, "--micro-batch-tokens", f"must be >= 1, got {self.micro_batch_tokens}")


@dataclass(frozen=True, kw_only=True)
class PromptsConfig(Config):
    """`lightopd prompts`: write a prompt file (JSONL) from a reasoning-gym task or another prompt source."""

    source: SourceSpec = opt(help="What to write records of: reasoning-gym:TASK, a task of the reasoning-gym "
                                  "package (e.g. chain_sum; `pip install 'lightopd[reasoning-gym]'`), whose records "
                                  "keep its question, answer and metadata; or any prompt source.", argument=True)
    out: str = opt(help="The JSONL file to write (it must not exist yet).", metavar="FILE")
    n: int | None = opt(None, "Records to write: the size of a reasoning-gym task's dataset [default: 1000], or the "
                              "first N records of another source [default: all].", metavar="N")
    seed: int = opt(0, "Seed of a reasoning-gym task's generator.", metavar="S")
    task_config: str | None = opt(None, "A reasoning-gym task's settings, a JSON object passed to its config (e.g. "
                                        "'{\"min_terms\": 4, \"max_terms\": 6}' for chain_sum).", metavar="JSON")

    def __post_init__(self) -> None:
        check(self.n is None or self.n >= 1, "--n", f"must be >= 1, got {self.n}")


@dataclass(frozen=True, kw_only=True)
class RewardConfig(Config):
    """`lightopd reward`: a store's rewards recomputed with another checker, into a new store."""

    data: str = opt(help="A rollout or teacher store.", metavar="STORE", argument=True)
    out: str = opt(help="Directory of the new store (or of one to finish).", metavar="DIR")
    checking: CheckerSpec = opt(CheckerSpec())
    tokenizer: str | None = opt(None, "Decode completions with this model's tokenizer (a directory or Hub id) "
                                      "[default: the model that sampled the store]", metavar="DIR|ID")
    worker: str = worker_option()

    def __post_init__(self) -> None:
        parse_worker(self.worker)


@dataclass(frozen=True, kw_only=True)
class InspectConfig(Config):
    """`lightopd inspect`: describe a store, and verify it."""

    data: str = opt(help="A store directory (holding manifest.json).", metavar="STORE", argument=True)
    verify: bool = opt(False, "Check every shard's checksum and row count; exit 2 naming any shard that is missing, "
                              "partial or corrupt.")
    show: int = opt(0, "Also print the first N rows, decoded with the tokenizer of the model that sampled them: "
                       "prompt, completion, answer, metadata, and per-row means of the stored log-probs.", metavar="N")
    stats: bool = opt(False, "Also compute, with polars over the checked shards (bounded memory): bytes per token of "
                             "each column, lengths, finish reasons, pass rates per prompt, and by position in the "
                             "completion the teacher's entropy, tail mass and log-prob and the student−teacher gap.")
    format: str = opt("text", "text: tables on stderr and the JSON line on stdout; json: the JSON line alone.",
                      choices=("text", "json"))

    def __post_init__(self) -> None:
        check(self.show >= 0, "--show", f"must be >= 0, got {self.show}")
