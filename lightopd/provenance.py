"""Provenance: what a model or store is, where it came from, and the teacher-consistency gate.

Fingerprints are cheap (seconds even for a 60 GB checkpoint) and change whenever the weights or
the vocabulary change:
- model: sha256 over `config.json` and every safetensors file's size and header (tensor names,
  dtypes, shapes, offsets) plus evenly spaced blocks of its bytes; small files are hashed whole.
  Any training run changes the sampled bytes; a deliberate edit of a single unsampled byte
  would not, which is the price of not re-reading every byte.
- tokenizer: sha256 over the token-to-id mapping, i.e. exactly what decides whether two models'
  token ids mean the same thing (a different chat template or EOS token does not change it; end
  tokens are compared separately, with a warning).
Every model `train` writes carries `lightopd.json`: its SFT teacher, parent, data, objective and
settings. The gate (`sft_teacher_of`) compares a student's recorded SFT teacher with the teacher
that scored its training data.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from lightopd.data.store import ROLLOUT_FORMAT, teacher_context
from lightopd.engine.models import PROVENANCE, check_model_dir, weight_files
from lightopd.errors import InputError
from lightopd.hub import locate
from lightopd.progress import console, warn

WHOLE_FILE_LIMIT = 32 << 20  # hash smaller weight files entirely
BLOCKS = 64  # evenly spaced blocks per larger file
BLOCK_SIZE = 256 << 10

CONSISTENCY = (
    "Offline OPD reaches the same optimum as online OPD only under teacher consistency: the teacher that "
    "scored these rollouts must be the teacher whose outputs the student was SFT-trained on. Otherwise the "
    "student is pulled between two teachers and the stored signal no longer points at one target."
)
SELF_TEACHER = ("Self-distillation needs a teacher that sees more than the student: give it a context with "
                "score-teacher --teacher-prompt (a reference solution, a hint, a rule, a system line).")


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
    for f in weight_files(p):
        _hash_file_sampled(h, f)
    return "sha256:" + h.hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    """Fingerprint of the vocabulary alone (token -> id): whether two models' ids mean the same
    tokens. A base and a chat checkpoint of one family share it although their EOS differ; which
    ids end a completion is compared separately (`eos_mismatch`)."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])).encode())
    return "sha256:" + h.hexdigest()[:32]


def eos_mismatch(store_eos: list[int], model_eos: list[int], model: str, role: str) -> str | None:
    """A warning when the completions of a store end with ids the model does not stop at."""
    if set(store_eos) <= set(model_eos):
        return None
    return (f"the store's completions end with token ids {sorted(store_eos)}, and {role} {model} stops at "
            f"{sorted(model_eos)}: same vocabulary, other end tokens (a base and a chat checkpoint of one "
            f"family, say). {role.capitalize()} will learn or score the store's end tokens as ordinary tokens; "
            "to stop at them when it generates, add them to its generation_config.json eos_token_id")


def read_provenance(path: str | Path) -> dict | None:
    """The `lightopd.json` record of a model directory, or None if it has none."""
    p = Path(path) / PROVENANCE
    if not p.is_file():
        return None
    try:
        record = json.loads(p.read_text())
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested past the parser's limit
        raise InputError(f"{p}: unreadable provenance file ({type(e).__name__}: {e})") from None
    if not isinstance(record, dict):
        raise InputError(f"{p}: not a provenance record (a JSON object), found a {type(record).__name__}")
    teacher = record.get("sft_teacher")
    if teacher is not None and not (isinstance(teacher, dict) and all(
            isinstance(teacher.get(key), str) for key in ("path", "fingerprint"))):
        raise InputError(f"{p}: its 'sft_teacher' is {teacher!r}, not a model record (an object with a 'path' and a "
                         "'fingerprint', as train writes it); the file was edited or damaged: remove the field, or "
                         "name the teacher with --sft-teacher")
    return record


def write_provenance(path: str | Path, record: dict) -> None:
    (Path(path) / PROVENANCE).write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")


def default_name(model: dict) -> str:
    """A model record's short name: its Hub repository's name, else its directory's."""
    return (model.get("hub_id") or "").split("/")[-1] or Path(model["path"]).name


def named(model: dict) -> str:
    """A model record's name for messages: its Hub id and commit when it has them, else its path."""
    if model.get("hub_id"):
        return f"{model['hub_id']}@{str(model.get('commit'))[:12]}"
    return model["path"]


def sft_teacher_of(manifest: dict, learns_from_teacher: bool, student: str, declared_path: str | None,
                   parent: dict | None, allow_mismatch: bool, own: tuple[str, ...] = (), data: str = "") -> dict | None:
    """The SFT teacher to record in a trained model's provenance, after the consistency gate.

    Training on samples without a teacher (SFT) records the model that wrote them. A teacher that is
    the student itself or its parent (fingerprints `own`) is self-distillation: consistent by
    construction when the teacher saw a recorded context of its own, refused (unless
    `allow_mismatch`) when it saw the student's prompts, which gives no signal. Otherwise the
    student's SFT teacher (`--sft-teacher`, else its lightopd.json) must be the teacher that scored
    the store: a mismatch is an InputError unless `allow_mismatch`, and no record is a warning. A
    student SFT-trained on several teachers' samples (`sft_teachers`) passes with any of them.
    `data` names the store in messages.
    """
    if not learns_from_teacher:
        writer = manifest["model"] if manifest["format"] == ROLLOUT_FORMAT else manifest["rollouts"]["model"]
        return {"path": writer["path"], "fingerprint": writer["fingerprint"]}
    if manifest["teacher"]["fingerprint"] in own:
        return _self_teacher(manifest, student, parent, allow_mismatch)
    if declared_path is not None:
        path = check_model_dir(declared_path, "--sft-teacher")
        declared = {"path": str(path.resolve()), **locate(declared_path).record(),
                    "fingerprint": model_fingerprint(path)}
    else:
        declared = (parent or {}).get("sft_teacher")
        mixture = [d for d in (parent or {}).get("sft_teachers") or [] if isinstance(d, dict)]
        declared = next((d for d in mixture if d.get("fingerprint") == manifest["teacher"]["fingerprint"]), declared)
    teacher = manifest["teacher"]
    if declared is None:
        warn(f"--student {student} has no recorded SFT teacher (no lightopd.json, no --sft-teacher), so "
             f"teacher consistency cannot be checked against the scoring teacher {named(teacher)}. " + CONSISTENCY)
        return None
    if declared["fingerprint"] != teacher["fingerprint"]:
        message = (f"the student's SFT teacher ({named(declared)}, {declared['fingerprint']}) is not the teacher "
                   f"that scored --data{' ' + data if data else ''} ({named(teacher)}, {teacher['fingerprint']}). "
                   + CONSISTENCY)
        if not allow_mismatch:
            raise InputError(message + " Pass --allow-teacher-mismatch to train anyway.")
        warn(message)
    return declared


def _self_teacher(manifest: dict, student: str, parent: dict | None, allow_mismatch: bool) -> dict | None:
    """The gate for a store scored by the student itself (or its parent): see `sft_teacher_of`."""
    teacher, context = manifest["teacher"], teacher_context(manifest)
    if context is None:
        message = (f"the teacher that scored --data ({named(teacher)}) is --student {student} itself (or its parent), "
                   "and it saw the student's own prompts: its log-probs are the student's, so every objective's "
                   "signal is zero. " + SELF_TEACHER)
        if not allow_mismatch:
            raise InputError(message + " Pass --allow-teacher-mismatch to train anyway.")
        warn(message)
    else:
        console.print(f"self-distillation: --data was scored by --student {student} itself (or its parent), seeing "
                      f"the context {context['template']!r} ({context['fingerprint']}) that the student does not; "
                      "teacher consistency holds by construction", highlight=False, soft_wrap=True)
    return (parent or {}).get("sft_teacher")
