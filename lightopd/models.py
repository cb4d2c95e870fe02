"""Load models and tokenizers from local directories; fingerprint them; read/write provenance.

Fingerprints are cheap (seconds even for a 60 GB checkpoint) and change whenever the weights or
the vocabulary change:
- model: sha256 over `config.json` and every safetensors file's size and header (tensor names,
  dtypes, shapes, offsets) plus evenly spaced blocks of its bytes; small files are hashed whole.
  Any training run changes the sampled bytes; a deliberate edit of a single unsampled byte
  would not, which is the price of not re-reading every byte.
- tokenizer: sha256 over the token-to-id mapping and the special tokens, i.e. exactly what
  decides whether two models' token ids mean the same thing (a different chat template does not
  change it).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch

from lightopd.errors import InputError

PROVENANCE = "lightopd.json"
WHOLE_FILE_LIMIT = 32 << 20  # hash smaller weight files entirely
BLOCKS = 64  # evenly spaced blocks per larger file
BLOCK_SIZE = 256 << 10


def check_model_dir(path: str | Path, what: str = "--model") -> Path:
    """The model directory as a Path; InputError unless it holds a config and safetensors weights."""
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{what} {path}: no such model directory (models are local Hugging Face directories)")
    if not (p / "config.json").is_file():
        raise InputError(f"{what} {path}: not a Hugging Face model directory (no config.json)")
    if not _weight_files(p):
        raise InputError(
            f"{what} {path}: no *.safetensors weights; lightopd loads weights only from safetensors "
            "(convert pickled .bin checkpoints first)"
        )
    return p


def _weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def _hash_file_sampled(h: hashlib._Hash, path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        if size <= WHOLE_FILE_LIMIT:
            h.update(f.read())
            return
        (header_len,) = struct.unpack("<Q", f.read(8))
        h.update(f.read(min(header_len, size - 8)))
        for i in range(BLOCKS):
            f.seek((size - BLOCK_SIZE) * i // (BLOCKS - 1))
            h.update(f.read(BLOCK_SIZE))


def model_fingerprint(path: str | Path) -> str:
    """Cheap content fingerprint of a model directory's config and weights."""
    p = Path(path)
    h = hashlib.sha256()
    config = json.loads((p / "config.json").read_text())
    config.pop("transformers_version", None)
    h.update(json.dumps(config, sort_keys=True).encode())
    for f in _weight_files(p):
        _hash_file_sampled(h, f)
    return "sha256:" + h.hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    """Fingerprint of the vocabulary (token -> id) and special tokens."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])).encode())
    h.update(json.dumps(
        {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id},
        sort_keys=True,
    ).encode())
    return "sha256:" + h.hexdigest()[:32]


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


def read_provenance(path: str | Path) -> dict | None:
    """The `lightopd.json` record of a model directory, or None if it has none."""
    p = Path(path) / PROVENANCE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{p}: unreadable provenance file ({e})") from None


def write_provenance(path: str | Path, record: dict) -> None:
    (Path(path) / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")


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
