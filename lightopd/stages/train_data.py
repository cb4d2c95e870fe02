"""What `train` reads: each `--data` store checked against the objective's needs, and several
stores (`--data A --data B`: teachers routed over one student's rollouts, or an SFT mixture of
several teachers' samples) checked to fit together before they are read as one stream.

Stores read together share a format, a vocabulary, a sampling temperature and, for teacher
stores, a top-k and its dtype; teacher stores over the same rollouts share no row and, unless
`--allow-unrouted`, leave none out (data/routes.py). Each teacher store is named (its manifest's
`teacher.name`, else its teacher's directory name), the name train reports per-teacher metrics
under and `--teacher-weight NAME=W` weighs its rows by.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from lightopd.config import TrainConfig
from lightopd.data.groups import reward_summary, rewards_by_prompt
from lightopd.data.reader import iter_batches
from lightopd.data.routes import check_cover
from lightopd.data.spans import Spans
from lightopd.data.store import (
    ROLLOUT_FORMAT,
    SUPPORT_COLUMNS,
    TEACHER_FORMAT,
    manifest_fingerprint,
    open_store,
    policy_is_behavior,
    reward_checker,
    sampling_of,
    store_columns,
    unavailable,
)
from lightopd.errors import InputError
from lightopd.objectives import Requirements
from lightopd.objectives.selection import SelectionSpec
from lightopd.progress import warn
from lightopd.provenance import default_name, sft_teacher_of


def check_data(path: str, name: str, needs: Requirements) -> dict:
    """The store's manifest, after checking it offers what the objective requires."""
    manifest = open_store(path, formats=(ROLLOUT_FORMAT, TEACHER_FORMAT))
    missing = [c for c in needs.columns if c not in store_columns(manifest)
               and not (c == "policy_logprobs" and policy_is_behavior(manifest))]
    if "policy_logprobs" in missing:
        sampling = sampling_of(manifest)
        how = ("greedily (temperature 0)" if sampling["temperature"] == 0
               else f"with top-p {sampling['top_p']}, whose truncation it cannot be rebuilt from")
        raise InputError(
            f"--data {path}: its rollouts were sampled before lightopd stored each token's log-prob under "
            f"the rollout model's untruncated softmax (policy_logprobs), and {how}; --objective {name} takes its "
            "ratios and rewards against it. Sample the store again with `lightopd rollout` (then score-teacher), "
            "or take them against the truncated distribution sampled from: --set objective.behavior=sampler")
    if "reference_logprobs" in missing and manifest["format"] == TEACHER_FORMAT:
        raise InputError(f"--data {path}: scored without a reference model, and --objective {name} takes ℓref from "
                         "one (objective.reference=scored); score the rollouts with `lightopd score-teacher "
                         "--reference MODEL` (the student's base), or take ℓref from the rollout model: "
                         "--set objective.reference=behavior")
    if any(c in SUPPORT_COLUMNS for c in missing) and manifest["format"] == TEACHER_FORMAT:
        raise InputError(f"--data {path}: scored without a sampled support, and --objective {name} with "
                         "objective.support=sampled reads one; score the rollouts with `lightopd score-teacher "
                         "--support-samples M` (50 draws hold about 12 distinct tokens), or train on the top-k: "
                         "--set objective.support=tail")
    empty = [c for c in missing if c in unavailable(manifest)]
    if empty:
        raise InputError(
            f"--data {path}: scored with --engine vllm, which cannot give {', '.join(empty)} (vLLM returns "
            f"the teacher's top-k, not the mass outside it), and --objective {name} needs them; score the rollouts "
            "with --engine hf, or train an objective that reads only the sampled token's log-prob "
            "(lightning-opd, g-opd, opd-is, opd-seq)")
    if missing:
        raise InputError(
            f"--data {path}: a rollout store has no teacher columns, and --objective {name} needs "
            f"them ({', '.join(missing)}); run `lightopd score-teacher` on it first (or use --objective sft)"
        )
    sampling = sampling_of(manifest)
    if sampling["n"] < needs.min_samples:
        raise InputError(f"--data {path}: holds {sampling['n']} sample(s) per prompt, and --objective "
                         f"{name} needs at least {needs.min_samples}: {needs.why}. Sample more with "
                         f"`lightopd rollout --n {needs.min_samples}`")
    if sampling["temperature"] == 0 and needs.behavior_probability:
        raise InputError(f"--data {path}: its rollouts were greedy (temperature 0), so every behaviour "
                         f"log-prob is 0 and no ratio to the rollout policy means anything; --objective {name} "
                         "reads them. Sample with --temperature > 0, or use an objective that does not "
                         "(lightning-opd, vopd, the top-k divergences, sft)")
    if manifest["rows"] == 0:
        raise InputError(f"--data {path}: the store holds no rows")
    if needs.rewards:
        check_rewards(path, manifest, name)
    return manifest


def check_rewards(data: str, manifest: dict, name: str) -> None:
    """Exit 2 unless every row has a reward; a warning when every prompt's samples scored alike."""
    how = ("sample prompts that have reference answers (rollout scores them with --checker), or add rewards to "
           f"this store's rows with `lightopd reward {data} --out NEW --checker NAME`")
    if reward_checker(manifest) is None:
        raise InputError(f"--data {data}: its rows have no rewards, and --objective {name} learns from them; {how}")
    summary = reward_summary(rewards_by_prompt(data, manifest))
    if summary["rows"] < manifest["rows"]:
        raise InputError(f"--data {data}: {manifest['rows'] - summary['rows']} of its {manifest['rows']} rows have "
                         f"no reward (their records have no answer), and --objective {name} needs one in every row")
    if summary["prompts_all_equal_share"] == 1.0:
        warn(f"--data {data}: every prompt's samples have equal rewards, so every group-relative advantage is 0: "
             f"--objective {name} gets no signal from the rewards")



def check_on_policy(cfg: TrainConfig, name: str, path: str, manifest: dict, student: dict, parent: dict | None
                    ) -> None:
    """Warn when an on-policy objective trains on rollouts of a model that is neither the student
    nor the model it was trained from."""
    writer = (manifest["model"] if manifest["format"] == ROLLOUT_FORMAT else manifest["rollouts"]["model"])
    ours = {student["fingerprint"], ((parent or {}).get("parent") or {}).get("fingerprint")}
    if cfg.allow_off_policy or writer["fingerprint"] in ours:
        return
    warn(f"--objective {name} learns from the student's own samples, and the rollouts of --data {path} were "
         f"sampled by {writer['path']} ({writer['fingerprint']}), not by --student {cfg.student.path} "
         f"({student['fingerprint']}) or the model it was trained from. Its signal is then off-policy: roll out "
         "the student itself, or pass --allow-off-policy to silence this")


def teacher_name(manifest: dict) -> str:
    """A teacher store's name: the one score-teacher recorded (--teacher-name, or its default)."""
    return manifest["teacher"].get("name") or default_name(manifest["teacher"])


def parse_weights(entries: tuple[str, ...], names: list[str]) -> dict[str, float]:
    """{teacher name: weight} from `--teacher-weight NAME=W` entries; unnamed teachers weigh 1."""
    out = dict.fromkeys(names, 1.0)
    for entry in entries:
        name, eq, value = entry.partition("=")
        try:
            weight = float(value) if eq else -1.0
        except ValueError:
            weight = -1.0
        if name not in out:
            known = ", ".join(names) or "none: teachers are named with several teacher stores"
            raise InputError(f"--teacher-weight {entry!r}: no --data store was scored by a teacher named {name!r} "
                             f"(the names: {known})")
        if not weight >= 0:
            raise InputError(f"--teacher-weight {entry!r}: expected NAME=WEIGHT with a weight >= 0")
        out[name] = weight
    return out


@dataclass(frozen=True)
class Mixture:
    """The `--data` stores of a run, checked to be read as one."""

    paths: tuple[str, ...]
    manifests: tuple[dict, ...]
    names: tuple[str, ...]  # each store's teacher name (empty for a single store: no per-teacher metrics)
    weights: dict[str, float]  # --teacher-weight by name ({} when every weight is 1)

    @property
    def manifest(self) -> dict:
        """The first store's manifest: what the stores share (format, tokenizer, sampling) is read from it."""
        return self.manifests[0]

    @property
    def rows(self) -> int:
        return sum(m["rows"] for m in self.manifests)

    def cost(self) -> dict[str, dict]:
        """Each teacher's share of the data: the rows and completion tokens it scored ({} for one store)."""
        return {name: {"rows": m["rows"], "tokens": m["tokens"]} for name, m in zip(self.names, self.manifests,
                                                                                    strict=True)}

    def record(self) -> dict:
        """The data block of a trained model's provenance: one store's record, or, for several, the
        first's with every store's, and a fingerprint of their manifests together."""
        stores = [{"path": str(Path(p).resolve()), "format": m["format"], "fingerprint": manifest_fingerprint(p),
                   "teacher": m.get("teacher")} for p, m in zip(self.paths, self.manifests, strict=True)]
        first = {**stores[0], "sampling": sampling_of(self.manifest)}
        if len(stores) == 1:
            return first
        together = "sha256:" + hashlib.sha256("\n".join(s["fingerprint"] for s in stores).encode()).hexdigest()[:32]
        return {**first, "path": [s["path"] for s in stores], "fingerprint": together,
                "teacher": [s["teacher"] for s in stores], "stores": stores, "weights": self.weights}


def mixture(cfg: TrainConfig, name: str, needs: Requirements) -> Mixture:
    """The `--data` stores, each checked for the objective, and together (see the module doc)."""
    paths = tuple(cfg.data)
    manifests = tuple(check_data(p, name, needs) for p in paths)
    if len(set(Path(p).resolve() for p in paths)) < len(paths):
        raise InputError(f"--data: a store is given twice ({', '.join(paths)})")
    first, head = manifests[0], paths[0]
    for path, manifest in zip(paths[1:], manifests[1:], strict=True):
        for what, get in (("format", lambda m: m["format"]), ("vocabulary", lambda m: m["tokenizer"]["fingerprint"]),
                          ("sampling temperature", lambda m: sampling_of(m)["temperature"]),
                          ("top-k", lambda m: m.get("scoring", {}).get("top_k")),
                          ("top-k dtype", lambda m: m.get("scoring", {}).get("topk_logprobs_dtype")),
                          ("draws per position", lambda m: m.get("scoring", {}).get("support_samples") or 0),
                          ("columns", store_columns), ("record of ℓold", policy_is_behavior)):
            if get(manifest) != get(first):
                raise InputError(f"--data {path}: its {what} ({get(manifest)}) differs from --data {head}'s "
                                 f"({get(first)}); stores trained on together must agree on it")
    teachers = first["format"] == TEACHER_FORMAT and len(paths) > 1
    names = tuple(teacher_name(m) for m in manifests) if teachers else ()
    if len(set(names)) < len(names):
        raise InputError(f"--data: two stores were scored by teachers named alike ({', '.join(names)}); name each "
                         "with score-teacher --teacher-name")
    if teachers:
        keys = {p: {(r["prompt_id"], r["sample_index"]) for b in iter_batches(
            p, columns=["prompt_id", "sample_index"], manifest=m) for r in b.to_pylist()}
            for p, m in zip(paths, manifests, strict=True)}
        for message in check_cover(list(zip(paths, manifests, strict=True)), keys, cfg.allow_unrouted):
            warn(message)
    weights = parse_weights(cfg.teacher_weight, list(names))
    return Mixture(paths, manifests, names, {} if all(w == 1.0 for w in weights.values()) else weights)


def check_spans(spec: SelectionSpec, mix: Mixture, decode) -> Spans:
    """Every row's spans (data/spans.py), read and checked once before training: a row without them
    or with a span outside its completion is exit 2 now, not when a step draws it. Returns the
    reader of the spans, for the trainer (a file of annotations is read once)."""
    spans = Spans(spec.token_spans, spec.token_span_units, spec.token_spans_file, decode)
    for path, manifest in zip(mix.paths, mix.manifests, strict=True):
        for batch in iter_batches(path, columns=["prompt_id", *spans.columns, "completion_ids"], manifest=manifest):
            spans.of(pa.Table.from_batches([batch]))
    return spans


def sft_teachers(mix: Mixture, learns_from_teacher: bool, student: str, declared: str | None, parent: dict | None,
                 allow_mismatch: bool, own: tuple[str, ...]) -> tuple[dict | None, list[dict]]:
    """The consistency gate on every store (provenance.sft_teacher_of); returns the SFT teacher to
    record and, when the stores name several (an SFT mixture, or teachers routed over one student's
    rollouts), all of them."""
    records = [sft_teacher_of(m, learns_from_teacher, student, declared, parent, allow_mismatch, own,
                              p if len(mix.paths) > 1 else "") for p, m in zip(mix.paths, mix.manifests, strict=True)]
    distinct = list({r["fingerprint"]: r for r in records if r}.values())
    return records[0], distinct if len(distinct) > 1 else []
