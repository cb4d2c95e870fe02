"""Which group of `--help` each option is listed in, and the groups' order (most used first).

An option declared in a nested spec is listed with its spec (SPECS, by the field holding the spec:
`sampling`, `engine`, ...), unless it is the option named after that field (`--prompts`); any
other is listed by its key (KEYS), else under OTHER. Presentation only: what an
option means and defaults to is declared once, beside it (options.py).
"""

from __future__ import annotations

from typer.core import TyperCommand

MAIN = "Data and model"
OBJECTIVE = "Objective"
OPTIMISATION = "Steps and optimisation"
TOKENS = "Which tokens teach"
SAMPLING = "Sampling"
PROMPTS = "Prompt source and rendering"
TEACHER = "What the teacher sees and stores"
MEMORY = "Memory and speed"
ENGINE = "Engine (vLLM)"
DISTRIBUTED = "Distributed and workers"
LORA = "LoRA"
CHECKPOINTS = "Checkpoints and resuming"
CHECKS = "Checks and their overrides"
LOGGING = "Logging"
DEMO = "The demo's task and models"
OTHER = "Other options"
ORDER = (MAIN, OBJECTIVE, TEACHER, OPTIMISATION, TOKENS, SAMPLING, PROMPTS, DEMO, MEMORY, ENGINE, DISTRIBUTED, LORA,
         CHECKPOINTS, CHECKS, LOGGING, OTHER)

SPECS = {"selection": TOKENS, "sampling": SAMPLING, "prompts": PROMPTS, "source": PROMPTS, "render": PROMPTS,
         "context": TEACHER, "encoding": TEACHER, "engine": ENGINE, "checking": CHECKS}
KEYS = {
    MAIN: ("student", "teacher", "model", "data", "out", "adapter", "base", "prompts", "source", "tokenizer",
           "heldout", "rounds", "verify", "show", "stats", "format", "n", "compare", "plot", "group_by"),
    OBJECTIVE: ("objective", "recipe", "set_", "set", "teacher_weight"),
    TEACHER: ("top_k", "temperature", "teacher_top_k", "where", "teacher_name", "reference"),
    PROMPTS: ("limit", "task_config"),
    DEMO: ("sft_prompts", "sft_steps", "sft_lr", "sft_batch_size", "opd_prompts", "opd_samples", "opd_steps", "opd_lr",
           "opd_batch_size", "heldout_prompts", "student_hidden", "student_layers", "student_heads", "student_arch",
           "student_dropout", "context"),
    ENGINE: ("engine",),
    OPTIMISATION: ("steps", "epochs", "batch_size", "lr", "schedule", "warmup_steps", "weight_decay", "adam_beta1",
                   "adam_beta2", "grad_clip", "seed", "shuffle_buffer", "dropout", "stop_when", "stop_window",
                   "steps_per_round", "refresh_when", "refresh_window", "prompts_per_round"),
    MEMORY: ("device", "dtype", "attn_implementation", "micro_batch_tokens", "packing", "loss_chunk_tokens",
             "gradient_checkpointing", "generation_batch_size", "kv_cache_tokens", "keep_teacher"),
    DISTRIBUTED: ("fsdp", "worker", "prompts_per_shard"),
    LORA: ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "merge_lora"),
    CHECKPOINTS: ("save_every", "keep_checkpoints", "resume"),
    CHECKS: ("sft_teacher", "allow_teacher_mismatch", "allow_off_policy", "allow_unrouted", "trust_remote_code"),
    LOGGING: ("report_to", "log_samples"),
}
_BY_KEY = {key: panel for panel, keys in KEYS.items() for key in keys}


def panel(key: str, path: tuple[str, ...] = ()) -> str:
    """The group of the option `key`, declared at `path` in its command's config."""
    if len(path) > 1 and path[0] in SPECS and key != path[0]:
        return SPECS[path[0]]
    return _BY_KEY.get(key, OTHER)


def rank(key: str, path: tuple[str, ...] = ()) -> int:
    """The position of the option's group in ORDER (for sorting a command's options)."""
    return ORDER.index(panel(key, path))


class PanelledCommand(TyperCommand):
    """A command whose --help lists its options group by group, in ORDER (each option's group is
    the `rich_help_panel` it was declared with; the plain formatter is kept, so help stays fast and
    greppable)."""

    def format_options(self, ctx, formatter) -> None:
        groups: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                groups.setdefault(getattr(param, "rich_help_panel", None) or OTHER, []).append(record)
        for name in sorted(groups, key=lambda g: ORDER.index(g) if g in ORDER else len(ORDER)):
            with formatter.section(name):
                formatter.write_dl(groups[name])
