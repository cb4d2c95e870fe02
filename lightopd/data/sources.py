"""Where prompt records come from: files and Hugging Face datasets, read lazily.

- `.jsonl` (or `.json`, `.ndjson`): one JSON object per line, decoded line by line.
- `.parquet`: read a batch of rows at a time, so a large file is never loaded whole.
- `.csv`: streamed by pyarrow's CSV reader (an empty cell is a missing value); a cell holding a
  JSON list (a `messages` column) is parsed when that field is used.
A table (Parquet, CSV) whose header names a column twice is refused, naming the column. A record
keeps its missing values (null) as None: what a missing field means is fields.py's to say.
- `hf:org/name` (with `--split`, default train, and `--subset`): a Hugging Face dataset through the
  optional `datasets` package, from the cache when it is there (with HF_HUB_OFFLINE set, only
  from the cache, and a miss names the dataset, the cache and the command that fetches it).
- a directory written by `datasets`' `save_to_disk` (a Dataset, or a DatasetDict and `--split`).

Each yields `(where, record)`: `where` names the file and line or row, for error messages.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lightopd import hub
from lightopd.data.store import sha256_file
from lightopd.errors import InputError

HF_PREFIX = "hf:"
BATCH = 4096


@dataclass(frozen=True)
class Source:
    """A prompt source: a file path, `hf:org/name`, or a save_to_disk directory."""

    spec: str
    split: str | None = None
    subset: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.spec.startswith(HF_PREFIX)

    def records(self) -> Iterator[tuple[str, dict]]:
        if self.is_hub or Path(self.spec).is_dir():
            yield from _dataset_records(self)
            return
        path = Path(self.spec)
        if not path.is_file():
            raise InputError(f"--prompts {path}: no such file")
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json", ".ndjson"):
            yield from _jsonl(path)
        elif suffix == ".parquet":
            yield from _parquet(path)
        elif suffix == ".csv":
            yield from _csv(path)
        else:
            raise InputError(f"{path}: unknown prompt file type {suffix!r} (use .jsonl, .parquet or .csv, a "
                             "save_to_disk directory, or hf:org/name)")

    def identity(self) -> dict:
        """What the store records of the source: where it is and a fingerprint of its content."""
        record = {"path": self.spec if self.is_hub else str(Path(self.spec).resolve()), "split": self.split,
                  "subset": self.subset}
        if not self.is_hub and Path(self.spec).is_file():
            record["fingerprint"] = "sha256:" + sha256_file(Path(self.spec))[:32]
        elif not self.is_hub:
            files = sorted(p for p in Path(self.spec).rglob("*") if p.is_file())
            record["fingerprint"] = "sha256:" + _combined([f"{p.relative_to(self.spec)}:{sha256_file(p)}"
                                                           for p in files])
        else:
            record["fingerprint"] = _load(self)[1]
        return record


def _combined(parts: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path} line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{where}: not UTF-8 text (byte {e.start + 1} of the line is "
                                 f"{raw[e.start:e.start + 1]!r})") from None
            if not line.strip():
                continue
            yield where, _json_record(where, line)


class _DuplicateKey(ValueError):
    """A JSON object naming one key twice (json would silently keep the last value)."""


def _unique(pairs: list[tuple[str, object]]) -> dict:
    record = dict(pairs)
    if len(record) < len(pairs):
        seen = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return record


def _json_record(where: str, line: str) -> object:
    """One JSON line, checked: valid, no key named twice in an object, not nested past Python's limit,
    and no lone surrogate escape (\\ud800-\\udfff), which decodes to something that is not text."""
    try:
        record = json.loads(line, object_pairs_hook=_unique)
    except _DuplicateKey as e:
        raise InputError(f"{where}: key {e.args[0]!r} appears twice in one object; JSON readers disagree on "
                         "which value counts, so give it once") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deeply to read") from None
    if "\\ud" in line.lower():
        try:
            json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"{where}: holds a lone surrogate escape (\\ud800-\\udfff), which is not text") from None
    return record


def _rows(batches, path: Path, names: list[str]) -> Iterator[tuple[str, dict]]:
    twice = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if twice is not None:  # a record would keep only one of the two
        raise InputError(f"{path}: the column {twice!r} appears twice in the header; rename one of them")
    row = 0
    for batch in batches:
        for record in batch.to_pylist():
            yield f"{path} row {row}", record
            row += 1


def _parquet(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path}: not a readable Parquet file ({e})") from None
    yield from _rows(pf.iter_batches(batch_size=BATCH), path, pf.schema_arrow.names)


def _csv(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    try:
        reader = pacsv.open_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
        yield from _rows(reader, path, reader.schema.names)
    except pa.ArrowInvalid as e:
        raise InputError(f"{path}: not a readable CSV file ({' '.join(str(e).split())})") from None


def _datasets():
    try:
        import datasets
    except ImportError:
        raise InputError("--prompts: Hugging Face datasets need the `datasets` package: "
                         "pip install 'lightopd[datasets]'") from None
    datasets.disable_progress_bars()
    return datasets


def _dataset_records(source: Source) -> Iterator[tuple[str, dict]]:
    dataset, _ = _load(source)
    where = source.spec + (f" ({source.split})" if source.split else "")
    for row, record in enumerate(dataset):
        yield f"{where} row {row}", record


def _load(source: Source):
    """(the dataset split a source names, its fingerprint), offline-first: a Hub snapshot in the cache,
    else what `datasets` cached from an earlier download, else (online only) a download."""
    if source.is_hub and not hub.HUB_ID.match(source.spec.removeprefix(HF_PREFIX)):
        raise InputError(f"--prompts {source.spec}: not a Hugging Face dataset id; write hf:org/name (or "
                         "hf:org/name@revision), or give a local file or save_to_disk directory without hf:")
    datasets = _datasets()
    if not source.is_hub:
        try:
            loaded = datasets.load_from_disk(source.spec)
        except (FileNotFoundError, ValueError) as e:
            raise InputError(f"--prompts {source.spec}: not a dataset saved with save_to_disk ({e})") from None
        if isinstance(loaded, datasets.DatasetDict):
            split = source.split or "train"
            if split not in loaded:
                raise InputError(f"--split {split}: {source.spec} has splits {', '.join(loaded)}")
            loaded = loaded[split]
        return loaded, loaded._fingerprint
    name = source.spec.removeprefix(HF_PREFIX)
    repo, _, revision = name.partition("@")
    revision = revision or "main"
    split = source.split or "train"
    snapshot = hub.cached(repo, revision, "dataset")
    try:
        if snapshot is not None:  # read in place, lazily: nothing converted, nothing fetched
            dataset = datasets.load_dataset(str(snapshot), source.subset, split=split, streaming=True)
            return dataset, f"hub:{repo}@{snapshot.name}"
        dataset = datasets.load_dataset(repo, source.subset, split=split, revision=revision)
        return dataset, dataset._fingerprint
    except ValueError as e:  # an unknown subset or split
        raise InputError(f"--prompts {source.spec}: {' '.join(str(e).split())} (--subset, --split)") from None
    except (ConnectionError, FileNotFoundError, OSError) as e:
        if hub.offline():
            raise hub.missing_offline("--prompts", source.spec, repo, revision, "dataset") from None
        raise InputError(f"--prompts {source.spec}: cannot load it ({' '.join(str(e).split())})") from None
