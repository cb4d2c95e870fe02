"""`lightopd merge`'s options: a LoRA adapter directory and where to write the merged model."""

from __future__ import annotations

from dataclasses import dataclass

from lightopd.options import opt


@dataclass(frozen=True, kw_only=True)
class MergeConfig:
    """`lightopd merge`: a LoRA adapter folded into its base model, written as a plain transformers model."""

    adapter: str = opt(help="A LoRA adapter directory (the output or a checkpoint of `train --lora-rank R`).",
                       metavar="ADAPTER", argument=True)
    out: str = opt(help="Directory of the merged model to write (it must not exist yet).", metavar="DIR")
    base: str | None = opt(None, "The base model the adapter was trained on. [default: the one the adapter "
                                 "records: its lightopd.json's parent, else adapter_config.json's base model]",
                           metavar="DIR|ID")
    trust_remote_code: bool = opt(False, "Allow the base model's own modelling code from its directory.")
