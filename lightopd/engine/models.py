"""Load models and tokenizers from local directories (safetensors only), choose device and dtype,
and read what generation needs from a model's config: context length, EOS ids, pad id."""

from __future__ import annotations

from pathlib import Path

import torch

from lightopd.errors import InputError


def check_model_dir(path: str | Path, what: str = "--model") -> Path:
    """The model directory as a Path; InputError unless it holds a config and safetensors weights."""
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{what} {path}: no such model directory (models are local Hugging Face directories)")
    if not (p / "config.json").is_file():
        raise InputError(f"{what} {path}: not a Hugging Face model directory (no config.json)")
    if not weight_files(p):
        raise InputError(
            f"{what} {path}: no *.safetensors weights; lightopd loads weights only from safetensors "
            "(convert pickled .bin checkpoints first)"
        )
    return p


def weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine")
    if name == "mps" and not torch.backends.mps.is_available():
        raise InputError("--device mps: MPS is not available on this machine")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA devices that support it, float32 elsewhere."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot load a tokenizer ({e})") from None


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False):
    """A causal LM from a local directory, in eval mode, on `device`, from safetensors only."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # lightopd draws its own progress
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot load a causal language model ({e})") from None
    return model.to(device).eval()


def context_length(config) -> int | None:
    """The longest sequence the model was built for, if its config says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def eos_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every token id that ends a completion: the tokenizer's EOS and the model's own list.

    Only the stopping tokens are taken from a model's generation config; its sampling defaults
    (temperature, top-k, ...) are never applied.
    """
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = getattr(generation_config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(i) for i in eos)
    return sorted(ids)


def generation_setup(path: str | Path, tokenizer, trust_remote_code: bool = False) -> tuple[int | None, list[int], int]:
    """(context length, EOS ids, pad id) of a model directory, read without loading its weights."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    try:
        generation_config = GenerationConfig.from_pretrained(str(path))
    except OSError:
        generation_config = None
    eos_ids = eos_token_ids(tokenizer, generation_config)
    if not eos_ids:
        raise InputError(f"{path}: neither the tokenizer nor the model names an EOS token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    return context_length(config), eos_ids, pad_id
