"""Hub ids (`org/name`, optionally `@revision`) found in the Hugging Face cache, offline-first.

A local path always wins. Otherwise an id is resolved through `huggingface_hub` and the standard
cache (`HF_HOME`, `HF_HUB_CACHE`): a cached snapshot is used without touching the network; a
missing one is downloaded, unless `HF_HUB_OFFLINE` is set, in which case the error names the id,
the cache and the command that fetches it. Of a model, only what lightopd reads is fetched:
safetensors weights, configs, tokenizer files and the chat template.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lightopd.errors import InputError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
MODEL_FILES = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", "tokenizer*",
               "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model", "*.jinja",
               "chat_template.json"]


@dataclass(frozen=True)
class Located:
    """Where something named on the command line is on this machine, and where it came from."""

    path: Path  # the local directory
    hub_id: str | None = None  # org/name when named by Hub id
    revision: str | None = None  # as asked (a branch, tag or commit; main by default)
    commit: str | None = None  # the commit the cache resolved it to
    shadows: str | None = None  # a local directory named like a cached Hub id: that id, not used

    def record(self) -> dict:
        """What provenance records of the origin: the Hub id, revision and commit, when there is one (and
        the cached Hub id a local directory of the same name was preferred to)."""
        if self.shadows is not None:
            return {"local_directory_over_hub_id": self.shadows}
        return {} if self.hub_id is None else {"hub_id": self.hub_id, "revision": self.revision, "commit": self.commit}


def is_hub_id(spec: str) -> bool:
    return not Path(spec).exists() and bool(HUB_ID.match(spec))


def fetch_command(repo: str, revision: str, repo_type: str = "model") -> str:
    return (f"hf download {repo}" + ("" if revision == "main" else f" --revision {revision}")
            + ("" if repo_type == "model" else f" --repo-type {repo_type}"))


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def cached(repo: str, revision: str, repo_type: str = "model", patterns: list[str] | None = None) -> Path | None:
    """The cached snapshot of `repo` at `revision`, or None; never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, repo_type=repo_type, revision=revision, allow_patterns=patterns,
                                      local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def _cached_quietly(spec: str) -> bool:
    """Whether the cache holds a model of Hub id `spec` (never touching the network, never failing)."""
    repo, _, revision = spec.partition("@")
    try:
        return cached(repo, revision or "main", patterns=MODEL_FILES) is not None
    except Exception:  # an unusable cache is simply not a cached model
        return False


def missing_offline(what: str, spec: str, repo: str, revision: str, repo_type: str = "model") -> InputError:
    return InputError(f"{what} {spec}: not in the Hugging Face cache ({cache_dir()}), and HF_HUB_OFFLINE is set so "
                      f"nothing is downloaded; fetch it with `{fetch_command(repo, revision, repo_type)}` on a "
                      "machine online (with the same HF_HOME / HF_HUB_CACHE), or unset HF_HUB_OFFLINE")


def locate(spec: str, what: str = "--model") -> Located:
    """The model `spec` names: a local directory, or a Hub id resolved through the cache. A local
    directory whose name is also a cached Hub id wins, and says so (in the log and, through
    `record`, in every manifest and provenance that records the model)."""
    if not is_hub_id(spec):
        if HUB_ID.match(spec) and Path(spec).is_dir() and _cached_quietly(spec):
            from lightopd.progress import console

            console.print(f"{what} {spec}: using the local directory {Path(spec).resolve()}, not the Hub model "
                          f"{spec} in the cache (write {Path(spec).resolve()} or ./{spec} to silence this note; "
                          "move the directory away to use the Hub model)", soft_wrap=True)
            return Located(Path(spec), shadows=spec)
        return Located(Path(spec))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    repo, _, revision = spec.partition("@")
    revision = revision or "main"
    path = cached(repo, revision, patterns=MODEL_FILES)
    if path is None:
        if offline():
            raise missing_offline(what, spec, repo, revision)
        try:
            path = Path(snapshot_download(repo, revision=revision, allow_patterns=MODEL_FILES))
        except (HfHubHTTPError, OSError, ValueError) as e:
            raise InputError(f"{what} {spec}: cannot download it from the Hugging Face Hub ({e}); a local "
                             f"directory, or `{fetch_command(repo, revision)}` beforehand, also works") from None
    return Located(path, repo, revision, path.name)
