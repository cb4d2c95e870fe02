"""Sharded Parquet stores: formats and schemas, and the manifest, read and checked.

A store is a directory holding `manifest.json` and shards `part-NNNNN.parquet`; the manifest
lists every complete shard with its rows, tokens, bytes and sha256, carries the store's id
(which every shard repeats in its Parquet metadata), and is the only place store-level metadata lives.
Reading shards, each checked against the manifest, is reader.py's job; writing, writer.py's.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pyarrow as pa

from lightopd.data.manifest_fields import FORMAT_VERSION, ROLLOUT_FORMAT, TEACHER_FORMAT, check_fields
from lightopd.errors import InputError

__all__ = ["FORMAT_VERSION", "ROLLOUT_FORMAT", "TEACHER_FORMAT"]  # defined with the manifest's fields

MANIFEST = "manifest.json"
SHARD_RE = re.compile(r"^part-(\d{5})\.parquet$")
STORE_ID_KEY = b"lightopd.store_id"  # the Parquet key-value metadata every shard carries
LAYOUT_KEY = b"lightopd.layout"  # ... and how its bytes are read (shard_layout), which no manifest edit can change

ROLLOUT_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("sample_index", pa.int32()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("completion_ids", pa.list_(pa.int32())),
        ("behavior_logprobs", pa.list_(pa.float32())),  # ℓμ: under the distribution sampled from
        ("policy_logprobs", pa.list_(pa.float32())),  # ℓold: under the model's untruncated softmax at T
        ("finish_reason", pa.string()),
        ("answer", pa.string()),
        ("metadata", pa.string()),  # the prompt record's other fields, a JSON object (null when none)
        ("reward", pa.float32()),  # the checker's score of the completion (null where the record has no answer)
        ("prompt", pa.string()),  # the prompt text a checker and a teacher template see (a chat's last message)
    ]
)


TEACHER_COLUMNS = ("teacher_logprobs", "topk_ids", "topk_logprobs", "teacher_log_tail", "teacher_entropy")


def teacher_schema(topk_dtype: str = "float16") -> pa.Schema:
    """Every rollout column, plus the teacher's per-token statistics."""
    values = pa.float16() if topk_dtype == "float16" else pa.float32()
    return pa.schema(list(ROLLOUT_SCHEMA) + [
        ("teacher_logprobs", pa.list_(pa.float32())),
        ("topk_ids", pa.list_(pa.int32())),
        ("topk_logprobs", pa.list_(values)),
        ("teacher_log_tail", pa.list_(pa.float32())),
        ("teacher_entropy", pa.list_(pa.float32())),
        ("teacher_prompt_ids", pa.list_(pa.int32())),  # what the teacher saw before the completion (null: prompt_ids)
        ("reference_logprobs", pa.list_(pa.float32())),  # a reference model's sampled-token log-probs (--reference)
        ("support_ids", pa.list_(pa.int32())),  # m tokens per position drawn from the teacher (--support-samples)
        ("support_logprobs", pa.list_(values)),  # the teacher's log-probs of them
    ])


SUPPORT_COLUMNS = ("support_ids", "support_logprobs")


def store_columns(manifest: dict) -> tuple[str, ...]:
    """The columns every row of the store has (not those its scorer could not fill: `unavailable`)."""
    schema = ROLLOUT_SCHEMA if manifest["format"] == ROLLOUT_FORMAT else teacher_schema()
    return tuple(c for c in schema.names if c not in unavailable(manifest))


def unavailable(manifest: dict) -> list[str]:
    """The columns a store's rows lack: teacher columns its scorer left empty (score-teacher --engine
    vllm), `policy_logprobs` where rows do not carry them (`policy_recorded`), and what stores written
    before rows carried them lack: `reward`, `prompt` (the text) and `teacher_prompt_ids`; and
    `reference_logprobs` unless score-teacher scored a `--reference`, and the sampled support unless
    it drew one (`--support-samples`)."""
    out = list(manifest.get("scoring", {}).get("unavailable", []))
    out += [] if policy_recorded(manifest) else ["policy_logprobs"]
    rollouts = rollouts_of(manifest)
    out += [] if "reward" in rollouts else ["reward"]
    out += [] if (rollouts.get("prompts") or {}).get("text") else ["prompt"]
    scoring = manifest.get("scoring")
    if scoring is None:
        return out
    return out + (["teacher_prompt_ids"] if "context" not in scoring else []) + (
        ["reference_logprobs"] if not scoring.get("reference") else []) + (
        list(SUPPORT_COLUMNS) if not scoring.get("support_samples") else [])


def teacher_context(manifest: dict) -> dict | None:
    """The teacher's context of a teacher store (score-teacher --teacher-prompt): its template,
    rendering and fingerprint; None where the teacher saw the student's own prompt."""
    return (manifest.get("scoring") or {}).get("context")


def policy_recorded(manifest: dict) -> bool:
    """Whether the store's rows carry `policy_logprobs`: rows sampled with truncation, penalties or
    greedily do; others, and stores sampled before rows carried them, do not."""
    return bool((rollouts_of(manifest).get("sampling") or {}).get("policy_logprobs"))


def rollouts_of(manifest: dict) -> dict:
    """The part of a manifest that describes the rollouts: the manifest itself for a rollout store, its
    `rollouts` record for a teacher store (empty where missing)."""
    return manifest if manifest.get("format") == ROLLOUT_FORMAT else manifest.get("rollouts") or {}


def reward_checker(manifest: dict) -> str | None:
    """The checker that scored the store's rewards; None where no row has one (no reference answers,
    or a store sampled before rows carried rewards)."""
    record = rollouts_of(manifest).get("reward")
    return record.get("checker") if isinstance(record, dict) else None


def policy_is_behavior(manifest: dict) -> bool:
    """Whether a store without `policy_logprobs` has them all the same in `behavior_logprobs`: it was
    sampled at a temperature > 0 with the whole vocabulary kept and no penalty (a store sampled
    before these settings existed had none but top-p), so the distribution sampled from was the
    model's own softmax at T."""
    sampling = sampling_of(manifest)
    untouched = (sampling["top_p"] >= 1.0 and not sampling.get("top_k") and not sampling.get("min_p")
                 and sampling.get("repetition_penalty", 1.0) == 1.0 and not sampling.get("presence_penalty")
                 and not sampling.get("frequency_penalty"))
    return not policy_recorded(manifest) and sampling["temperature"] > 0 and untouched


def shard_layout(manifest: dict) -> dict:
    """What decides how a shard's bytes are read: its format, the vocabulary its ids index (the
    tokenizer's fingerprint and size), the sampler its behaviour log-probs were drawn from
    (temperature, top-p and, where the store records them, top-k, min-p and penalties) and, for
    a teacher store, k (the top-k values per position), their dtype, order and bits, the teacher's
    temperature and the draws per position of its sampled support.
    Every shard carries it in its own Parquet metadata (LAYOUT_KEY), and readers check the manifest
    against it: no manifest edit changes what the bytes mean."""
    scoring = manifest.get("scoring") or {}
    tokenizer = manifest.get("tokenizer") or {}
    sampling = rollouts_of(manifest).get("sampling") or {}
    layout = {"format": manifest["format"], "tokenizer": tokenizer.get("fingerprint"),
              "vocab_size": tokenizer.get("vocab_size"), "temperature": sampling.get("temperature"),
              "top_p": sampling.get("top_p"), "top_k": scoring.get("top_k"),
              "topk_logprobs_dtype": scoring.get("topk_logprobs_dtype"),
              "teacher_temperature": scoring.get("temperature")}
    if "topk_order" in scoring:  # (stores from before it: descending)
        layout |= {"topk_order": scoring["topk_order"], "topk_bits": scoring.get("topk_bits")}
    if "support_samples" in scoring:  # (stores from before it drew none)
        layout |= {"support_samples": scoring["support_samples"]}
    if "top_k" in sampling:  # stores from before these settings existed declare none of them
        layout |= {"sampling": {key: sampling.get(key) for key in SAMPLER_KEYS}}
    return layout


# the sampling settings that shape behavior_logprobs, beyond temperature and top-p
SAMPLER_KEYS = ("top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def sampling_of(manifest: dict) -> dict:
    """The sampling settings of the rollouts in a store (n, temperature, top_p, top_k, min_p, penalties,
    stop texts, max_new_tokens, seed; stores sampled before top-k and the rest lack those keys)."""
    return rollouts_of(manifest)["sampling"]


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def shard_index(name: str) -> int:
    return int(SHARD_RE.match(name).group(1))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

def read_manifest(directory: str | Path) -> dict:
    """The manifest of the store at `directory`; InputError if there is none or it is unreadable."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise InputError(f"{directory}: no such store directory")
    if not path.is_file():
        raise InputError(f"{directory}: not a lightopd store (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested past the parser's limit
        raise InputError(f"{path}: unreadable manifest ({type(e).__name__}: {e})") from None
    check_fields(path, manifest, SHARD_RE)
    return manifest


def check_version(directory: str | Path, manifest: dict) -> None:
    """InputError unless the store is of the format this lightopd reads and writes."""
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or not isinstance(manifest.get("store_id"), str):
        raise InputError(f"{directory}: a store of format version {version}, and this lightopd reads version "
                         f"{FORMAT_VERSION} (version 2 added the teacher's exact tail mass and fingerprints "
                         "tokenizers by their vocabulary alone; version 3 keeps each prompt record's other fields as "
                         "metadata); re-run the command that wrote it")

def manifest_fingerprint(directory: str | Path) -> str:
    """sha256 of a store's manifest: names the exact content a derived store was computed from."""
    return "sha256:" + sha256_file(Path(directory) / MANIFEST)[:32]


def open_store(directory: str | Path, formats: tuple[str, ...] | None = None) -> dict:
    """The manifest of a complete store, for reading; InputError if it is not one."""
    manifest = read_manifest(directory)
    check_version(directory, manifest)
    if formats is not None and manifest["format"] not in formats:
        raise InputError(f"{directory}: is a {manifest['format']!r} store; expected {' or '.join(formats)}")
    listed = sorted(shard_index(s["name"]) for s in manifest["shards"])
    if listed and listed[-1] >= manifest["num_shards"]:
        raise InputError(f"{directory}: its manifest lists {shard_name(listed[-1])} but says the store has "
                         f"{manifest['num_shards']} shards; the manifest was edited or damaged: re-run the command "
                         "that wrote the store")
    if not manifest.get("complete") or listed != list(range(manifest.get("num_shards", -1))):
        raise InputError(
            f"{directory}: store is incomplete ({len(manifest['shards'])} of "
            f"{manifest.get('num_shards')} shards); re-run the command that writes it to finish it"
        )
    if sum(s["rows"] for s in manifest["shards"]) != manifest.get("rows"):
        raise InputError(f"{directory}: its manifest's shards hold {sum(s['rows'] for s in manifest['shards'])} rows "
                         f"and it says {manifest.get('rows')}; the manifest was edited or damaged")
    return manifest


def describe(directory: str | Path) -> dict:
    """A summary of the store for `inspect`: its metadata, sizes and bytes per token."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    total_bytes = sum(s["bytes"] for s in manifest["shards"])
    tokens = manifest.get("tokens", 0)
    summary = {k: v for k, v in manifest.items() if k != "shards"}
    summary.update(
        path=str(directory),
        shards_written=len(manifest["shards"]),
        bytes=total_bytes,
        bytes_per_token=round(total_bytes / tokens, 2) if tokens else None,
    )
    return summary
