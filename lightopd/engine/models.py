"""Load models and tokenizers from model directories (a local path, or the Hub snapshot hub.py
resolved; safetensors only), choose device and dtype, and read what the stages need from a
model's config before loading it (ModelInfo): context length, EOS and pad ids, the tokenizer's
vocabulary and the output layer's rows. A directory is checked before it is read: its weights'
framing, and whether it is a train run that did not finish (then resuming it is the way out)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lightopd.engine import held
from lightopd.errors import InputError
from lightopd.hub import locate

if TYPE_CHECKING:
    from lightopd.specs import ModelSpec

PROVENANCE = "lightopd.json"  # a model directory's provenance record (provenance.py reads and writes it)

def check_model_dir(path: str | Path, what: str = "--model") -> Path:
    """The model's local directory (a Hub id is resolved through the cache first); InputError unless
    it holds a config and sound safetensors weights, or if it is a train run that did not finish."""
    p = locate(str(path), what).path
    if not p.is_dir():
        raise InputError(f"{what} {path}: no such model directory, and not a Hub id (org/name) either")
    if unfinished_run(p):
        raise InputError(f"{what} {path} is a lightopd train run that did not finish (it has no {PROVENANCE}, which a "
                         f"run writes last, after its model): resume it with `lightopd train … --out {path} --resume` "
                         "(the run's own command plus --resume), or wait if it is still running")
    if not (p / "config.json").is_file():
        if (p / "adapter_config.json").is_file():
            raise InputError(f"{what} {path}: a LoRA adapter, not a model; write the merged model with `lightopd "
                             f"merge {path} --out DIR` (or train with --merge-lora), and use that")
        raise InputError(f"{what} {path}: not a Hugging Face model directory (no config.json)")
    if not weight_files(p):
        raise InputError(
            f"{what} {path}: no *.safetensors weights; lightopd loads weights only from safetensors "
            "(convert pickled .bin checkpoints first)"
        )
    problem = weights_problem(p)
    if problem:
        raise InputError(f"{what} {path}: {problem}; re-download or re-save the model")
    return p


def weights_problem(path: Path) -> str | None:
    """What is wrong with a model directory's safetensors files (none; one truncated or not safetensors;
    a file its index lists missing), read from their headers alone; None if they are sound."""
    files = weight_files(path)
    if not files:
        return "it holds no *.safetensors weights"
    for f in files:
        problem = safetensors_problem(f)
        if problem:
            return f"{f.name} is {problem}"
    for index in path.glob("*.safetensors.index.json"):
        try:
            listed = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            listed = None
        if listed is None or not all(isinstance(name, str) for name in listed):
            return f"{index.name} is not a readable safetensors index"
        missing = sorted(name for name in listed if not (path / name).is_file())
        if missing:
            return f"{missing[0]}, listed in {index.name}, is missing"
    return None


def unfinished_run(path: Path) -> bool:
    """Whether `path` is the --out of a train run that has not written its final model: it holds the
    run's metrics or checkpoints but no provenance file, which a run moves into place after every
    file of its model (training/checkpoints.py: publish_model)."""
    ran = (path / "metrics.jsonl").is_file() or (path / "checkpoints").is_dir()
    return ran and not (path / PROVENANCE).is_file()


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's framing (truncated, not safetensors), read from its
    header alone; None if the header parses and the file holds every byte it promises."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated ({size} bytes)"
        length = int.from_bytes(head, "little")
        if length > size - 8:
            return f"truncated or not a safetensors file (a header of {length} bytes in {size})"
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "not a safetensors file (its header is not JSON)"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2]
    needed = 8 + length + max(ends, default=0)
    return None if size >= needed else f"truncated ({size} bytes of {needed})"


def read_error(e: Exception, path: str | Path, what: str, thing: str) -> InputError:
    """An InputError for a model directory transformers could not read, with the way out when the
    model ships its own code."""
    if "trust_remote_code" in str(e):
        return InputError(f"{what} {path}: its {thing} needs Python code shipped in the model directory; pass "
                          "--trust-remote-code if you trust its source")
    return InputError(f"{what} {path}: cannot read its {thing} ({e})")


def load_error(e: Exception, path: str | Path, what: str, attn_implementation: str | None,
               thing: str) -> InputError:
    """`read_error`, or the attention kernel's flag when that is what transformers refused."""
    if attn_implementation and attn_implementation in str(e):
        return InputError(f"--attn-implementation {attn_implementation}: {str(e).splitlines()[0]}")
    return read_error(e, path, what, thing)


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
    """`auto` is bfloat16 on CUDA devices that support it, float32 elsewhere; a dtype the device
    cannot compute in is an InputError."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} does not support it; use float32 "
                         "(or float16 for inference)")
    return getattr(torch, name)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "bpe.codes", "chat_template.jinja", "chat_template.json")
_TOKENIZERS: dict[str, object] = {}  # by the content of their files: a process that loads one many times
                                     # (lightopd rounds: each round's student directory) reads it once


def load_tokenizer(path: str | Path, trust_remote_code: bool = False, what: str = "--model"):
    """A model directory's tokenizer (never changed by lightopd, so one copy serves every caller
    that reads the same files)."""
    from transformers import AutoTokenizer

    key = _tokenizer_key(Path(path), trust_remote_code)
    if key is not None and key in _TOKENIZERS:
        return _TOKENIZERS[key]
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise read_error(e, path, what, "tokenizer") from None
    if key is not None:
        if len(_TOKENIZERS) >= 8:
            _TOKENIZERS.pop(next(iter(_TOKENIZERS)))
        _TOKENIZERS[key] = tokenizer
    return tokenizer


def _tokenizer_key(path: Path, trust_remote_code: bool) -> str | None:
    """A hash of the directory's tokenizer files (None where it holds none of them, or is not a directory)."""
    import hashlib

    if not path.is_dir() or trust_remote_code:  # remote code may read any file: no cache
        return None
    h, found = hashlib.sha256(), False
    config = path / "config.json"  # AutoTokenizer may pick its class by the model type
    if config.is_file():
        try:
            fields = json.loads(config.read_text())
            h.update(f"{fields.get('model_type')}:{fields.get('tokenizer_class')}".encode())
        except (ValueError, UnicodeDecodeError, AttributeError):
            return None
    templates = path / "additional_chat_templates"
    extra = sorted(f"additional_chat_templates/{p.name}" for p in templates.iterdir()) if templates.is_dir() else []
    for name in (*TOKENIZER_FILES, *extra):
        file = path / name
        if file.is_file():
            h.update(name.encode() + b"\0" + file.read_bytes() + b"\0")
            found = True
    return h.hexdigest() if found else None


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False,
               what: str = "--model", attn_implementation: str | None = None, trains: bool = False):
    """A causal LM from a local directory, in eval mode, on `device`, from safetensors only, with the
    attention kernel asked for (None: transformers' choice); the model held for the directory, if
    one is (engine/held.py: `trains` takes it from there, else it stays held)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    model = held.take(Path(path), device, dtype, attn_implementation, keep=not trains)
    if model is not None:
        return model
    hf_logging.disable_progress_bar()  # lightopd draws its own progress
    attention = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, **attention
        )
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise load_error(e, path, what, attn_implementation, "weights as a causal language model") from None
    return model.to(device).eval()


def empty_model(path: str | Path, trust_remote_code: bool = False, what: str = "--model",
                attn_implementation: str | None = None):
    """The causal LM of a model directory's config on the meta device (float32, no memory, no
    weights): built so that it can be sharded before anything is allocated (training/parallel.py
    then fills each rank's shards)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    attention = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                     trust_remote_code=trust_remote_code, **attention)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise load_error(e, path, what, attn_implementation, "config as a causal language model") from None
    try:  # kept with the model as from_pretrained keeps it, so that a saved model carries it on
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(path))
    except OSError:
        pass
    return model.eval()


def without_dropout(model) -> None:
    """Dropout off everywhere in `model`, in training mode too: a log-prob of the training forward
    is then the policy's own, so an importance ratio is 1 until the weights move. Covers dropout
    modules and the attention dropout rate attention modules read from their config."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def context_length(config) -> int | None:
    """The longest sequence the model was built for, if its config says (for multimodal layouts
    such as Gemma 3, the nested text model's)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for cfg in (config, text):
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(cfg, key, None)
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


@dataclass(frozen=True)
class ModelInfo:
    """What the stages need to know of a model before loading its weights."""

    context: int | None  # longest sequence, if the config says
    eos_ids: list[int]  # ids that end a completion
    pad_id: int
    vocab: int  # the tokenizer's ids: every distribution is over these
    output_rows: int | None  # rows of the output layer as configured (>= vocab; the rest is padding)


def model_info(path: str | Path, tokenizer, trust_remote_code: bool = False, what: str = "--model") -> ModelInfo:
    """A model directory's context length, EOS and pad ids and vocabulary, read without loading its
    weights; InputError if its output layer has fewer rows than its tokenizer has ids."""
    from transformers import AutoConfig, GenerationConfig

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise read_error(e, path, what, "config") from None
    try:
        generation_config = GenerationConfig.from_pretrained(str(path))
    except OSError:
        generation_config = None
    eos_ids = eos_token_ids(tokenizer, generation_config)
    if not eos_ids:
        raise InputError(f"{what} {path}: neither the tokenizer nor the model names an EOS token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    rows = getattr(text, "vocab_size", None)
    if isinstance(rows, int) and rows < len(tokenizer):
        raise InputError(f"{what} {path}: its tokenizer has {len(tokenizer)} ids but its output layer only {rows} "
                         "rows; the tokenizer does not belong to this model")
    return ModelInfo(context_length(config), eos_ids, pad_id, len(tokenizer), rows)


def hf_model(model_dir: Path, spec: ModelSpec):
    """The transformers model as `spec` asks for it (device, dtype, attention kernel)."""
    device = resolve_device(spec.device)
    return load_model(model_dir, device, resolve_dtype(spec.dtype, device), spec.trust_remote_code,
                      attn_implementation=spec.attn_implementation)
