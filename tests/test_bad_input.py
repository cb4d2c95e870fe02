"""Bad input, as a careless user or an attacker gives it: one row per case, each run through the
real command line. Every row states the exit code and a word the one-line message must hold; for
exit 2 the message is a single `error:` line with no traceback, nothing is printed on stdout, and
no store or model is left behind (the README counts the rows)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightopd.data.store import ROLLOUT_FORMAT
from lightopd.data.writer import StoreWriter
from lightopd.tiny import default_words, make_model
from tests.helpers import Exploit, cli, do_rollout, do_score, do_train, write_jsonl


@dataclass
class Env:
    """What a case builds on: the session's models and stores, and a fresh directory."""

    tmp: Path
    tiny_model: Path
    plain_model: Path
    teacher_model: Path
    rollout_store: Path
    teacher_store: Path
    prompts: Path

    def copy(self, source: Path, name: str) -> Path:
        shutil.copytree(source, self.tmp / name)
        return self.tmp / name

    def jsonl(self, records, name="p.jsonl") -> str:
        return str(write_jsonl(self.tmp / name, records))

    def edit_manifest(self, store: Path, change) -> Path:
        manifest = json.loads((store / "manifest.json").read_text())
        change(manifest)
        (store / "manifest.json").write_text(json.dumps(manifest))
        return store


# ---- building blocks of the cases ----

def rollout(e: Env, prompts: str | Path, *extra: str, model: Path | None = None) -> list[str]:
    return ["rollout", "--model", str(model or e.tiny_model), "--prompts", str(prompts), "--out", str(e.tmp / "out"),
            "--max-new-tokens", "4", *extra]


def score(e: Env, *extra: str, teacher: Path | None = None, data: Path | None = None) -> list[str]:
    return ["score-teacher", "--teacher", str(teacher or e.teacher_model), "--data", str(data or e.rollout_store),
            "--out", str(e.tmp / "out"), *extra]


def train(e: Env, *extra: str, student: Path | None = None, data: Path | None = None, out: Path | None = None
          ) -> list[str]:
    return ["train", "--student", str(student or e.tiny_model), "--data", str(data or e.teacher_store),
            "--out", str(out or e.tmp / "out"), "--steps", "1", "--batch-size", "4", *extra]


def evaluate(e: Env, *extra: str, prompts: str | None = None) -> list[str]:
    prompts = prompts or e.jsonl([{"prompt": "w1", "answer": "w2"}], "answers.jsonl")
    return ["eval", "--model", str(e.tiny_model), "--prompts", prompts, "--max-new-tokens", "2", *extra]


def edited(e: Env, store: Path, change) -> Path:
    """A copy of `store` with its manifest changed by `change`."""
    return e.edit_manifest(e.copy(store, "edited"), change)


def flip_a_bit(store: Path, shard: str = "part-00001.parquet") -> Path:
    data = bytearray((store / shard).read_bytes())
    data[len(data) // 2] ^= 1
    (store / shard).write_bytes(bytes(data))
    return store


def model_with(e: Env, name: str, change) -> Path:
    model = e.copy(e.tiny_model, name)
    change(model)
    return model


def nan_weights(model: Path) -> None:
    tensors = load_file(model / "model.safetensors")
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], float("nan"))
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


def truncated_weights(model: Path) -> None:
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])


def remote_code(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="lightopd-custom", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (model / "config.json").write_text(json.dumps(config))


def foreign_shard(e: Env) -> Path:
    """A store whose shard 1 was copied in from another teacher's store, its manifest entry patched to
    the copy's size and sha256: only the shard's store id tells it apart."""
    other = e.tmp / "other-teacher"
    do_score(e.plain_model, e.rollout_store, other, top_k=6)
    store = e.copy(e.teacher_store, "mixed")
    shutil.copy(other / "part-00001.parquet", store / "part-00001.parquet")
    entry = next(s for s in json.loads((other / "manifest.json").read_text())["shards"]
                 if s["name"] == "part-00001.parquet")

    def patch(manifest):
        for s in manifest["shards"]:
            if s["name"] == "part-00001.parquet":
                s.update(bytes=entry["bytes"], sha256=entry["sha256"])
    return e.edit_manifest(store, patch)


def empty_store(e: Env) -> Path:
    manifest = json.loads((e.rollout_store / "manifest.json").read_text())
    meta = {k: manifest[k] for k in ("model", "tokenizer", "sampling", "prompts", "prompts_per_shard")}
    StoreWriter(e.tmp / "empty", ROLLOUT_FORMAT, meta, num_shards=0)
    return e.edit_manifest(e.tmp / "empty", lambda m: m.update(complete=True))


def greedy_store(e: Env) -> Path:
    do_rollout(e.tiny_model, e.prompts, e.tmp / "greedy-r", temperature=0.0, max_new_tokens=4)
    do_score(e.teacher_model, e.tmp / "greedy-r", e.tmp / "greedy-t", top_k=4)
    return e.tmp / "greedy-t"


def one_sample_store(e: Env) -> Path:
    do_rollout(e.tiny_model, e.prompts, e.tmp / "n1-r", n=1, max_new_tokens=4)
    do_score(e.teacher_model, e.tmp / "n1-r", e.tmp / "n1-t", top_k=4)
    return e.tmp / "n1-t"


@dataclass(frozen=True)
class Case:
    id: str
    build: object  # Env -> argv
    code: int
    word: str


CASES = [
    # ---- prompt files (rollout and eval) ----
    Case("missing prompt file", lambda e: rollout(e, e.tmp / "nope.jsonl"), 2, "nope.jsonl: no such file"),
    Case("malformed json line", lambda e: rollout(e, _write(e, '{"prompt": "w1"}\n\n{"prompt": "w2"\n')), 2,
         "line 3: not valid JSON"),
    Case("not utf-8", lambda e: rollout(e, _write(e, b'{"prompt": "w1"}\n{"prompt": "w\xff"}\n')), 2,
         "line 2: not UTF-8 text"),
    Case("not utf-8, eval", lambda e: evaluate(e, prompts=_write(e, b'{"prompt": "\xc3", "answer": "1"}\n')), 2,
         "line 1: not UTF-8 text"),
    Case("prompt and messages", lambda e: rollout(e, e.jsonl(
        [{"prompt": "w1"}, {"prompt": "w1", "messages": [{"role": "user", "content": "w1"}]}])), 2,
        "line 2: record has both of 'prompt' (a prompt) and 'messages'"),
    Case("neither prompt nor messages", lambda e: rollout(e, e.jsonl([{"id": "a", "answer": "3"}])), 2,
         "line 1: record has neither a prompt nor messages"),
    Case("mapped field missing", lambda e: rollout(e, e.jsonl([{"question": "w1"}]), "--prompt-field", "text"), 2,
         "line 1: no field 'text' (--prompt-field); the record's fields are 'question'"),
    Case("mapped field of a wrong type", lambda e: rollout(e, e.jsonl([{"q": "w1", "gold": {"a": 1}}]),
                                                           "--prompt-field", "q", "--answer-field", "gold"), 2,
         "line 1: field 'gold' (the answer) must be a string or a number, got dict"),
    Case("field flag without prompts, eval", lambda e: ["eval", "--model", str(e.tiny_model), "--data",
                                                        str(e.teacher_store), "--answer-field", "gold"], 2,
         "--answer-field: only with --prompts"),
    Case("prompt not a string", lambda e: rollout(e, e.jsonl([{"prompt": 3}])), 2,
         "field 'prompt' (the prompt) must be a string"),
    Case("message without content", lambda e: rollout(e, e.jsonl([{"messages": [{"role": "user"}]}])), 2,
         "field 'messages'[0]"),
    Case("duplicate id", lambda e: rollout(e, e.jsonl([{"id": "x", "prompt": "w1"}] * 2)), 2,
         "line 2: duplicate id 'x'"),
    Case("empty prompt file", lambda e: rollout(e, _write(e, "\n")), 2, "holds no records"),
    Case("messages without a chat template", lambda e: rollout(e, e.jsonl(
        [{"prompt": "w1"}, {"messages": [{"role": "user", "content": "w1"}]}]), model=e.plain_model), 2,
        "line 2: messages need a chat template"),
    Case("prompt longer than the context", lambda e: rollout(e, e.jsonl(
        [{"prompt": "w1"}, {"prompt": " ".join(f"w{i}" for i in range(12))}]),
        model=make_model(e.tmp / "short", context=8)), 2, "context of 8 tokens"),
    Case("eval prompt without answer", lambda e: evaluate(e, prompts=e.jsonl([{"prompt": "w1"}])), 2,
         "line 1: no reference answer"),
    Case("prompt over --max-prompt-tokens", lambda e: rollout(e, e.jsonl([{"prompt": "w1 w2 w3"}]),
                                                              "--max-prompt-tokens", "2"), 2,
         "line 1: prompt is 4 tokens, over the limit of 2 (--max-prompt-tokens)"),
    Case("max prompt tokens of zero", lambda e: rollout(e, e.prompts, "--max-prompt-tokens", "0"), 2,
         "--max-prompt-tokens: must be >= 1"),
    Case("unknown long-prompts policy", lambda e: rollout(e, e.prompts, "--long-prompts", "drop"), 2,
         "--long-prompts"),
    Case("unknown chat mode", lambda e: rollout(e, e.prompts, "--chat", "sometimes"), 2, "--chat"),
    Case("chat template kwargs not JSON", lambda e: rollout(e, e.prompts, "--chat-template-kwargs", "{thinking}"), 2,
         "--chat-template-kwargs: not JSON"),
    Case("chat template kwargs not an object", lambda e: rollout(e, e.prompts, "--chat-template-kwargs", "[1]"), 2,
         "--chat-template-kwargs: must be a JSON object"),
    Case("system prompt with plain prompts", lambda e: rollout(e, e.jsonl([{"prompt": "w1"}]), "--system-prompt",
                                                               "be brief"), 2,
         "--system-prompt: no prompt is rendered with the chat template"),
    Case("chat always without a template", lambda e: rollout(e, e.prompts, "--chat", "always", model=e.plain_model), 2,
         "--chat always: the tokenizer of --model has no chat template"),
    Case("split of a dataset that is not there", lambda e: rollout(e, _saved_dataset(e), "--split", "dev"), 2,
         "--split dev"),
    # ---- models ----
    Case("model directory missing", lambda e: rollout(e, e.prompts, model=e.tmp / "no-model"), 2,
         "no such model directory"),
    Case("model without weights", lambda e: rollout(e, e.prompts, model=_cfg_only(e)), 2, "no *.safetensors weights"),
    Case("truncated safetensors", lambda e: rollout(e, e.prompts, model=model_with(e, "cut", truncated_weights)), 2,
         "model.safetensors is truncated"),
    Case("model needing remote code", lambda e: rollout(e, e.prompts, model=model_with(e, "rc", remote_code)), 2,
         "--trust-remote-code"),
    Case("teacher needing remote code", lambda e: score(e, teacher=model_with(e, "rc", remote_code)), 2,
         "--trust-remote-code"),
    Case("model with NaN weights", lambda e: rollout(e, e.prompts, model=model_with(e, "nan", nan_weights)), 2,
         "logits are not finite"),
    Case("teacher with NaN weights", lambda e: score(e, teacher=model_with(e, "nan", nan_weights)), 2,
         "logits are not finite"),
    Case("teacher prompt naming a missing field", lambda e: score(e, "--teacher-prompt", "{solution} {prompt}"), 2,
         "has no field 'solution'"),
    Case("teacher prompt with an unmatched brace", lambda e: score(e, "--teacher-prompt", "{prompt"), 2,
         "not a format template"),
    Case("teacher prompt of fixed text", lambda e: score(e, "--teacher-prompt", "think hard"), 2, "names no field"),
    Case("teacher chat option without a template", lambda e: score(e, "--teacher-system-prompt", "w1"), 2,
         "only with --teacher-prompt"),
    Case("teacher system prompt on plain teacher prompts", lambda e: score(
        e, "--teacher-prompt", "{prompt}", "--teacher-system-prompt", "w1"), 2,
        "--teacher-system-prompt: the teacher's prompts are plain text"),
    Case("teacher prompt too long", lambda e: score(e, "--teacher-prompt", " ".join(["{prompt}"] * 40)), 2,
         "exceeds the teacher's context"),
    Case("self-teacher without a context", lambda e: train(e, "--objective", "lightning-opd", student=e.tiny_model,
                                                            data=_self_scored(e)), 2, "signal is zero"),
    Case("divergence selection on a rollout store", lambda e: train(e, "--objective", "sft", "--token-select",
                                                                     "divergence", data=e.rollout_store), 2,
         "--token-select divergence: ranks positions"),
    Case("token share out of range", lambda e: train(e, "--token-select", "entropy", "--token-keep", "0"), 2,
         "--token-keep: must be in (0, 1]"),
    Case("teacher of another vocabulary", lambda e: score(e, teacher=make_model(e.tmp / "o", default_words(41))), 2,
         "differs from the one the rollouts were sampled with"),
    Case("student of another vocabulary", lambda e: train(e, student=make_model(e.tmp / "o", default_words(41))), 2,
         "its vocabulary (sha256:"),
    Case("teacher shorter than the rows", lambda e: score(e, teacher=make_model(e.tmp / "s", seed=2, context=8)), 2,
         "longer than the teacher's context of 8"),
    Case("provenance with a damaged SFT teacher", lambda e: train(e, student=model_with(
        e, "s", lambda m: (m / "lightopd.json").write_text('{"sft_teacher": 5}'))), 2,
        "its 'sft_teacher' is 5, not a model record"),
    Case("provenance not an object", lambda e: train(e, student=model_with(
        e, "s", lambda m: (m / "lightopd.json").write_text("[1, 2]"))), 2, "not a provenance record"),
    # ---- options ----
    Case("n of zero", lambda e: rollout(e, e.prompts, "--n", "0"), 2, "--n: samples per prompt must be in 1..65536"),
    Case("n beyond memory", lambda e: rollout(e, e.prompts, "--n", "9223372036854775807"), 2,
         "--n: samples per prompt must be in 1..65536"),
    Case("n not a number", lambda e: rollout(e, e.prompts, "--n", "two"), 2, "--n"),
    Case("negative temperature", lambda e: rollout(e, e.prompts, "--temperature", "-0.5"), 2,
         "--temperature: must be 0 (greedy decoding) or at least"),
    Case("vanishing temperature", lambda e: rollout(e, e.prompts, "--temperature", "1e-40"), 2,
         "--temperature: must be 0 (greedy decoding) or at least 0.001"),
    Case("top-p of zero", lambda e: rollout(e, e.prompts, "--top-p", "0"), 2, "--top-p: must be in (0, 1]"),
    Case("rollout with an unknown checker", lambda e: rollout(e, e.prompts, "--checker", "fuzzy"), 2,
         "--checker: must be one of"),
    Case("rewards written into the store read", lambda e: ["reward", str(e.teacher_store), "--out",
                                                             str(e.teacher_store), "--checker", "exact"], 2,
         "the store being read"),
    Case("negative top-k", lambda e: rollout(e, e.prompts, "--top-k", "-1"), 2, "--top-k: must be >= 0"),
    Case("min-p of one", lambda e: rollout(e, e.prompts, "--min-p", "1"), 2, "--min-p: must be in [0, 1)"),
    Case("repetition penalty of zero", lambda e: rollout(e, e.prompts, "--repetition-penalty", "0"), 2,
         "--repetition-penalty: must be > 0"),
    Case("presence penalty beyond 2", lambda e: rollout(e, e.prompts, "--presence-penalty", "3"), 2,
         "--presence-penalty: must be in [-2, 2]"),
    Case("empty stop text", lambda e: rollout(e, e.prompts, "--stop", ""), 2, "--stop: must be non-empty text"),
    Case("unknown ratio reference", lambda e: train(e, "--objective", "opd-is", "--set", "objective.behavior=both"),
         2, "objective.behavior: must be policy or sampler"),
    Case("no new tokens", lambda e: rollout(e, e.prompts, "--max-new-tokens", "0"), 2,
         "--max-new-tokens: must be >= 1"),
    Case("unknown dtype", lambda e: rollout(e, e.prompts, "--dtype", "float8"), 2, "--dtype: must be one of"),
    Case("worker out of range", lambda e: score(e, "--worker", "2/2"), 2, "--worker: expected 0 <= I < N"),
    Case("worker not I/N", lambda e: score(e, "--worker", "half"), 2, "--worker: expected I/N"),
    Case("k of zero", lambda e: score(e, "--top-k", "0"), 2, "--top-k"),
    Case("k above the vocabulary", lambda e: score(e, "--top-k", "51"), 2, "--top-k 51"),
    Case("lr of zero", lambda e: train(e, "--lr", "0"), 2, "--lr: must be > 0"),
    Case("lr of inf", lambda e: train(e, "--lr", "inf"), 2, "--lr: must be a finite number"),
    Case("lr beyond float32", lambda e: train(e, "--lr", "1e39"), 2, "--lr: must be at most 3.40282e+38"),
    Case("epochs of inf", lambda e: ["train", "--student", str(e.tiny_model), "--data", str(e.teacher_store),
                                     "--out", str(e.tmp / "out"), "--epochs", "inf"], 2,
         "--epochs: must be a finite number"),
    Case("lr of nan by --set", lambda e: train(e, "--set", "lr=nan"), 2, "--lr: must be a finite number"),
    Case("objective parameter of inf", lambda e: train(e, "--objective", "jsd", "--set", "objective.beta=inf"), 2,
         "objective.beta: must be a finite number"),
    Case("unknown objective", lambda e: train(e, "--objective", "kd"), 2, "unknown objective"),
    Case("unknown packing mode", lambda e: train(e, "--packing", "yes"), 2, "--packing"),
    Case("negative lora rank", lambda e: train(e, "--lora-rank", "-1"), 2, "--lora-rank: must be >= 0"),
    Case("merge without lora", lambda e: train(e, "--merge-lora"), 2, "--merge-lora: there is no adapter"),
    Case("unknown tracker", lambda e: train(e, "--report-to", "tensorbord"), 2, "--report-to: must be none, all"),
    Case("loss chunk of zero", lambda e: train(e, "--loss-chunk-tokens", "0"), 2, "--loss-chunk-tokens: must be >= 1"),
    Case("unknown attention kernel", lambda e: train(e, "--attn-implementation", "warp_attention"), 2,
         "--attn-implementation warp_attention"),
    Case("kv-cache budget of zero", lambda e: rollout(e, e.prompts, "--kv-cache-tokens", "0"), 2,
         "--kv-cache-tokens: must be >= 1"),
    Case("unknown engine", lambda e: rollout(e, e.prompts, "--engine", "sglang"), 2, "--engine"),
    Case("vllm option with the hf engine", lambda e: evaluate(e, "--tensor-parallel-size", "2"), 2,
         "--tensor-parallel-size: only with --engine vllm"),
    Case("gpu memory share over 1", lambda e: score(e, "--engine", "vllm", "--gpu-memory-utilization", "1.5"), 2,
         "--gpu-memory-utilization: must be in (0, 1]"),
    Case("objective parameter of the wrong type", lambda e: train(e, "--objective", "jsd", "--set",
                                                                  "objective.beta=x"), 2,
         "objective.beta: expected float, got 'x'"),
    Case("recipe with an unknown key", lambda e: train(e, "--recipe", _write(e, "[train]\nlearnig_rate = 1e-5\n",
                                                                             "r.toml")), 2,
         "unknown training key 'learnig_rate'"),
    Case("recipe not TOML", lambda e: train(e, "--recipe", _write(e, "[train\n", "r.toml")), 2, "not valid TOML"),
    Case("bad checker", lambda e: evaluate(e, "--checker", "fuzzy"), 2,
         "--checker: must be one of auto, exact, math, reasoning-gym or MODULE:FUNCTION"),
    Case("checker file missing", lambda e: evaluate(e, "--checker", "nope.py:judge"), 2, "no such file nope.py"),
    Case("compare with an option it ignores", lambda e: ["eval", "--compare", _write(e, "{}", "r.json"), "--n", "4"],
         2, "--n: not used with --compare"),
    Case("log samples into a directory", lambda e: evaluate(e, "--log-samples", str(e.tmp)), 2,
         ": is a directory; give the file's path"),
    Case("prompts file already there", lambda e: ["prompts", str(e.prompts), "--out", str(e.prompts)], 2,
         "exists; remove it or choose another file"),
    Case("unknown reasoning-gym task", lambda e: ["prompts", "reasoning-gym:no_such_task", "--out",
                                                  str(e.tmp / "rg.jsonl")], 2, "reasoning-gym"),
    Case("plot without compare", lambda e: evaluate(e, "--plot", str(e.tmp / "c.png")), 2,
         "--plot: only with --compare"),
    # ---- outputs ----
    Case("out holds other files", lambda e: _other_files(e) and rollout(e, e.prompts), 2,
         "not empty and holds no lightopd store"),
    Case("out cannot be created", lambda e: ["rollout", "--model", str(e.tiny_model), "--prompts", str(e.prompts),
                                             "--out", "/sys/lightopd-out"], 2, "cannot write there"),
    Case("train out is a file", lambda e: train(e, out=Path(_write(e, "x", "a-file"))), 2,
         "exists and is not a directory"),
    Case("train out cannot be created", lambda e: train(e, out=Path("/sys/lightopd-out")), 2, "cannot write there"),
    Case("train out holds a previous run", lambda e: _other_files(e) and train(e, "--objective", "sft"), 2,
         "pass --resume"),
    Case("eval out in a missing directory", lambda e: evaluate(e, "--out", str(e.tmp / "missing" / "x.json")), 2,
         "no such directory"),
    Case("compare of a JSON list", lambda e: ["eval", "--compare", _write(e, "[1, 2]", "r.json")], 2,
         "not an eval result (a JSON object)"),
    Case("compare of a non-JSON file", lambda e: ["eval", "--compare", _write(e, "{not json", "r.json")], 2,
         "not a readable eval result"),
    # ---- stores ----
    Case("not a store", lambda e: ["inspect", str(e.tmp)], 2, "not a lightopd store"),
    Case("not a rollout store", lambda e: score(e, data=e.tmp), 2, "not a lightopd store"),
    Case("train on a rollout store", lambda e: train(e, data=e.rollout_store), 2, "a rollout store has no teacher"),
    Case("empty store", lambda e: train(e, "--objective", "sft", data=empty_store(e)), 2, "the store holds no rows"),
    Case("incomplete rollout store", lambda e: score(e, data=edited(e, e.rollout_store, lambda m: m.update(
        shards=m["shards"][:2], complete=False))), 2, "store is incomplete (2 of 4 shards)"),
    Case("shortened manifest", lambda e: train(e, data=edited(e, e.teacher_store, lambda m: m.update(
        shards=m["shards"][:3]))), 2, "store is incomplete (3 of 4 shards)"),
    Case("damaged rollout store", lambda e: score(e, data=flip_a_bit(e.copy(e.rollout_store, "r"),
                                                                     "part-00002.parquet")),
         2, "damaged store (part-00002.parquet: corrupt"),
    Case("bit flip, train", lambda e: train(e, data=flip_a_bit(e.copy(e.teacher_store, "t"))), 2,
         "part-00001.parquet is corrupt (sha256 differs"),
    Case("bit flip, eval", lambda e: evaluate(e, "--data", str(flip_a_bit(e.copy(e.teacher_store, "t")))), 2,
         "part-00001.parquet is corrupt"),
    Case("truncated shard", lambda e: train(e, data=_truncate(e.copy(e.teacher_store, "t"))), 2,
         "part-00003.parquet is corrupt ("),
    Case("deleted shard", lambda e: train(e, data=_delete(e.copy(e.teacher_store, "t"))), 2,
         "part-00000.parquet is missing"),
    Case("foreign shard, train", lambda e: train(e, data=foreign_shard(e)), 2, "part-00001.parquet is foreign"),
    Case("foreign shard, eval", lambda e: evaluate(e, "--data", str(foreign_shard(e))), 2,
         "part-00001.parquet is foreign"),
    Case("foreign shard, inspect", lambda e: ["inspect", "--verify", str(foreign_shard(e))], 2,
         "part-00001.parquet: foreign"),
    Case("manifest entry without bytes", lambda e: train(e, data=edited(
        e, e.teacher_store, lambda m: m["shards"][0].pop("bytes"))), 2, "has no valid 'bytes'"),
    Case("manifest path outside the store", lambda e: train(e, data=edited(
        e, e.teacher_store, lambda m: m["shards"][0].update(name="../../x/part-00000.parquet"))), 2,
        "never points outside its directory"),
    Case("store of an older format", lambda e: train(e, data=edited(
        e, e.teacher_store, lambda m: m.update(format_version=1))), 2, "format version 1"),
    Case("store missing in eval", lambda e: evaluate(e, "--data", "/nonexistent/store"), 2, "no such store directory"),
    Case("greedy store for opd-is", lambda e: train(e, "--objective", "opd-is", "--allow-teacher-mismatch",
                                                    data=greedy_store(e)), 2, "greedy"),
    Case("one sample per prompt for opd-seq", lambda e: train(e, "--objective", "opd-seq", "--allow-teacher-mismatch",
                                                              data=one_sample_store(e)), 2, "holds 1 sample(s)"),
    # ---- locks, manifests and shard layouts ----
    Case("lock is a symlink, train", lambda e: train(e, out=_lock_link(e)), 2, "is a symbolic link"),
    Case("lock is a symlink, rollout", lambda e: rollout(e, e.prompts) if _lock_link(e) else None, 2,
         "is a symbolic link"),
    Case("manifest k edited down, train", lambda e: train(e, "--objective", "rkl", data=edited(
        e, e.teacher_store, lambda m: m["scoring"].update(top_k=4))), 2, "written with top_k 6 (the manifest says 4)"),
    Case("manifest k edited up, train", lambda e: train(e, "--objective", "rkl", data=edited(
        e, e.teacher_store, lambda m: m["scoring"].update(top_k=1000))), 2, "top_k 6 (the manifest says 1000)"),
    Case("manifest k edited, eval", lambda e: evaluate(e, "--data", str(edited(
        e, e.teacher_store, lambda m: m["scoring"].update(top_k=4)))), 2, "top_k 6 (the manifest says 4)"),
    Case("manifest k edited, inspect", lambda e: ["inspect", "--verify", str(edited(
        e, e.teacher_store, lambda m: m["scoring"].update(top_k=4)))], 2, "inconsistent with the manifest"),
    Case("shard rows of the wrong length", lambda e: train(e, "--objective", "rkl", data=_short_rows(e)), 2,
         "column 'teacher_logprobs', holds"),
    Case("manifest field of a wrong type, inspect", lambda e: ["inspect", str(edited(
        e, e.teacher_store, lambda m: m.update(rows="twelve")))], 2, "field 'rows' is 'twelve', expected an integer"),
    Case("manifest sampling of a wrong type, train", lambda e: train(e, data=edited(
        e, e.teacher_store, lambda m: m["rollouts"]["sampling"].update(top_p="high"))), 2,
        "field 'rollouts.sampling.top_p' is 'high'"),
    Case("manifest without a tokenizer, score", lambda e: score(e, data=edited(
        e, e.rollout_store, lambda m: m.pop("tokenizer"))), 2, "field 'tokenizer' is missing"),
    Case("manifest listing a shard twice", lambda e: train(e, data=edited(
        e, e.teacher_store, lambda m: m["shards"].append(m["shards"][0]))), 2, "lists shard part-00000.parquet twice"),
    Case("hub dataset without a name", lambda e: rollout(e, "hf:"), 2, "--prompts hf:: not a Hugging Face dataset id"),
    Case("hub dataset that is a path", lambda e: rollout(e, "hf:/etc"), 2, "--prompts hf:/etc: not a Hugging Face"),
    Case("batch larger than the store", lambda e: train(e, "--batch-size", "1000000"), 2,
         "--batch-size 1000000 is more rows than the store holds (20)"),
    Case("manifest sampling temperature edited", lambda e: train(e, "--objective", "rkl", data=edited(
        e, e.teacher_store, lambda m: m["rollouts"]["sampling"].update(temperature=2.0))), 2,
        "written with temperature 1.0 (the manifest says 2.0)"),
    Case("manifest eos outside the vocabulary", lambda e: train(e, data=edited(
        e, e.teacher_store, lambda m: m["tokenizer"].update(pad_token_id=999))), 2,
        "field 'tokenizer.pad_token_id' holds 999, outside the vocabulary of 50 ids"),
    Case("manifest shard tokens edited, inspect", lambda e: ["inspect", "--verify", str(edited(
        e, e.teacher_store, lambda m: m["shards"][0].update(tokens=10 ** 30)))], 2,
        "the manifest says 1000000000000000000000000000000)"),
    Case("manifest with fewer shards than it lists", lambda e: train(e, data=edited(
        e, e.teacher_store, lambda m: m.update(num_shards=1))), 2, "says the store has 1 shards"),
    Case("manifest nested too deeply", lambda e: ["inspect", _write(e, "[" * 100000 + "]" * 100000,
                                                                    "deep/manifest.json").rsplit("/", 1)[0]], 2,
         "unreadable manifest (RecursionError"),
    Case("prompt line nested too deeply", lambda e: rollout(e, _write(
        e, '{"prompt": "w1", "x": ' + "[" * 100000 + "]" * 100000 + "}\n")), 2, "line 1: JSON nested too deeply"),
    Case("prompt line with a key twice", lambda e: rollout(e, _write(e, '{"prompt": "w1", "prompt": "w2"}\n')), 2,
         "line 1: key 'prompt' appears twice in one object"),
    Case("prompt with a lone surrogate", lambda e: rollout(e, _write(e, '{"prompt": "w1 \\ud800"}\n')), 2,
         "line 1: holds a lone surrogate escape"),
    Case("compare of a result that is not eval's", lambda e: ["eval", "--compare", _write(e, "{}", "r.json")], 2,
         "not an eval result (its 'command' is None"),
    Case("compare of a mis-typed metric", lambda e: ["eval", "--compare", _write(
        e, '{"command": "eval", "accuracy": "high"}', "r.json")], 2, "its 'accuracy' is 'high', not a fraction"),
    Case("compare of a pass@k list", lambda e: ["eval", "--compare", _write(
        e, '{"command": "eval", "pass@k": [1, 2]}', "r.json")], 2, "its 'pass@k' is [1, 2]"),
    Case("compare of NaN", lambda e: ["eval", "--compare", _write(
        e, '{"command": "eval", "accuracy": NaN}', "r.json")], 2, "NaN is not standard JSON"),
    Case("recipe with train as a list", lambda e: train(e, "--recipe", _write(e, "train = [1, 2]\n", "r.toml")), 2,
         "'train' must be a table"),
    Case("recipe naming the objective at the top", lambda e: train(e, "--recipe", _write(
        e, 'objective = "rkl"\n', "r.toml")), 2, "'objective' must be a table"),
    Case("recipe not UTF-8", lambda e: train(e, "--recipe", _write(e, b"[train]\nlr = \xff\n", "r.toml")), 2,
         "not UTF-8 text"),
    Case("recipe that is a directory", lambda e: train(e, "--recipe", str(e.tmp)), 2, "is a directory"),
    # ---- checkers and prompt records ----
    Case("checker timeout of zero", lambda e: evaluate(e, "--checker", "c.py:judge", "--checker-timeout", "0"), 2,
         "--checker-timeout: must be > 0"),
    Case("checker timeout of nan", lambda e: evaluate(e, "--checker", "c.py:judge", "--checker-timeout", "nan"), 2,
         "--checker-timeout: must be a finite number"),
    Case("checker timeout with a built-in checker", lambda e: evaluate(e, "--checker-timeout", "5"), 2,
         "--checker-timeout: only with a checker of your own"),
    Case("checker that exits on import", lambda e: evaluate(
        e, "--checker", _write(e, "import sys\nsys.exit(0)\n", "quits.py") + ":judge"), 2,
        "quits.py:judge: importing"),
    Case("checker that hangs on import", lambda e: evaluate(
        e, "--checker", _write(e, "import time\ntime.sleep(600)\n", "slow.py") + ":judge", "--checker-timeout", "1"), 2,
        "slow.py:judge did not finish importing within 1 s; fix it or raise --checker-timeout"),
    Case("csv column twice", lambda e: rollout(e, _write(e, "prompt,answer,prompt\nw1,2,w3\n", "p.csv")), 2,
         "p.csv: the column 'prompt' appears twice"),
    Case("null prompt in parquet", lambda e: rollout(e, _parquet(e, {"prompt": ["w1", None], "answer": ["3", "4"]})),
         2, "p.parquet row 1: field 'prompt' is null (empty) in this record"),
    Case("unknown chat role", lambda e: rollout(e, e.jsonl([{"messages": [
        {"role": "user", "content": "w1"}, {"role": "wizard", "content": "w2"}]}])), 2,
        "line 1: field 'messages'[1] has the role 'wizard'; the roles are system, user, assistant, tool"),
    Case("unknown sharegpt speaker", lambda e: rollout(e, e.jsonl([{"conversations": [
        {"from": "alien", "value": "w1"}]}])), 2, "line 1: field 'conversations'[0] is a turn from 'alien'"),
    Case("empty prompt", lambda e: rollout(e, e.jsonl([{"prompt": "w1"}, {"prompt": ""}])), 2,
         "line 2: field 'prompt' (the prompt) is empty"),
    Case("white space prompt", lambda e: rollout(e, e.jsonl([{"question": " \n\t"}])), 2,
         "line 1: field 'question' (the prompt) is white space only"),
    Case("system turn only", lambda e: rollout(e, e.jsonl([{"messages": [{"role": "system", "content": "w1"}]}])), 2,
         "line 1: field 'messages' holds no user turn"),
    Case("chat template kwargs with NaN", lambda e: rollout(e, e.prompts, "--chat-template-kwargs", '{"x": NaN}'), 2,
         "--chat-template-kwargs: NaN is not standard JSON"),
    # ---- checkpoints, the final model and LoRA ----
    Case("checkpoint state a pickle of objects", lambda e: resume(e, _damaged_run(e, _exploit)), 2,
         "checkpoint step-2 is not a lightopd checkpoint (its trainer_state.pt holds Python objects other than"),
    Case("checkpoint state missing keys", lambda e: resume(e, _damaged_run(e, lambda c: torch.save(
        {"step": int(c.name[5:])}, c / "trainer_state.pt"))), 2,
         "checkpoint step-2 is not a lightopd checkpoint (its trainer_state.pt lacks world_size, cursor"),
    Case("checkpoint state of wrong types", lambda e: resume(e, _damaged_run(e, _cursor_as_text)), 2,
         "(its trainer_state.pt holds a str as 'cursor')"),
    Case("checkpoints without their weights", lambda e: resume(e, _damaged_run(
        e, lambda c: (c / "model.safetensors").unlink())), 2,
         "checkpoint step-2 is damaged (it holds no *.safetensors weights) (and the 1 older one cannot"),
    Case("resume a finished run without checkpoints", lambda e: resume(e, _finished_run(e), steps=3), 2,
         "holds a finished run of 1 step (its model is"),
    Case("resume a finished run at its steps", lambda e: resume(e, _finished_run(e, save_every=1), steps=1),
         2, "holds a finished run of 1 step (its model is"),
    Case("eval of a train run that did not finish", lambda e: evaluate(e, "--model", str(_unfinished_run(e))), 2,
         "is a lightopd train run that did not finish"),
    # ---- routed teachers and spans ----
    Case("route without a value", lambda e: score(e, "--where", "domain"), 2, "expected FIELD=VALUE"),
    Case("route that takes no row", lambda e: score(e, "--where", "domain=math"), 2,
         "takes none of the 20 rows"),
    Case("reference with another vocabulary", lambda e: score(e, "--reference", str(_other_vocabulary(e))), 2,
         "--reference"),
    Case("teacher weight of an unknown teacher", lambda e: train(e, "--teacher-weight", "math=2"), 2,
         "no --data store was scored by a teacher named 'math'"),
    Case("the same store twice", lambda e: train(e, "--data", str(e.teacher_store)), 2, "a store is given twice"),
    Case("span loss without an objective", lambda e: train(e, "--span-loss", "key"), 2,
         "is not KIND=OBJECTIVE[:WEIGHT]"),
    Case("spans file missing", lambda e: train(e, "--span-loss", "key=fkl", "--token-spans-file",
                                               str(e.tmp / "nope.jsonl")), 2, "cannot be read"),
]


def _other_vocabulary(e: Env) -> Path:
    from lightopd.tiny import make_model

    return make_model(e.tmp / "other-vocab", words=[f"v{i}" for i in range(30)])


MID_RUN = {"model with NaN weights", "teacher with NaN weights",  # found once sampling or scoring has begun
           "bit flip, train", "bit flip, eval", "truncated shard", "deleted shard", "foreign shard, train",
           "foreign shard, eval", "manifest k edited, eval"}
USAGE = {"n not a number"}  # click's own usage error: exit 2 with its usage lines


def _self_scored(e: Env) -> Path:
    """The rollout store scored by the model that sampled it, with no context of its own."""
    do_score(e.tiny_model, e.rollout_store, e.tmp / "self-t", top_k=4)
    return e.tmp / "self-t"


def _saved_dataset(e: Env) -> str:
    """A DatasetDict saved with save_to_disk (train and test), or a plain file without `datasets`."""
    try:
        import datasets
    except ImportError:
        pytest.skip("the datasets extra is not installed")
    part = datasets.Dataset.from_dict({"prompt": ["w1"]})
    datasets.DatasetDict({"train": part, "test": part}).save_to_disk(str(e.tmp / "ds"))
    return str(e.tmp / "ds")


def _write(e: Env, content: str | bytes, name: str = "p.jsonl") -> str:
    path = e.tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def _parquet(e: Env, columns: dict, name: str = "p.parquet") -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), e.tmp / name)
    return str(e.tmp / name)


def _cfg_only(e: Env) -> Path:
    (e.tmp / "cfg-only").mkdir()
    (e.tmp / "cfg-only" / "config.json").write_text("{}")
    return e.tmp / "cfg-only"


def _other_files(e: Env) -> bool:
    (e.tmp / "out").mkdir()
    (e.tmp / "out" / "metrics.jsonl").write_text("mine")
    return True


def _lock_link(e: Env) -> Path:
    """An output directory whose lock file is a symbolic link to a file of the user's."""
    (e.tmp / "out").mkdir()
    (e.tmp / "precious.txt").write_text("keep me")
    (e.tmp / "out" / ".lightopd.lock").symlink_to(e.tmp / "precious.txt")
    return e.tmp / "out"


def _short_rows(e: Env) -> Path:
    """A store whose shard 0 was rewritten (and its manifest entry and store id patched to match) with
    one row's teacher log-probs a value short: only the row check can tell."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lightopd.data.store import sha256_file

    store = e.copy(e.teacher_store, "short")
    path = store / "part-00000.parquet"
    table = pq.read_table(path)
    values = table.column("teacher_logprobs").to_pylist()
    values[1] = values[1][:-1]
    table = table.set_column(table.schema.get_field_index("teacher_logprobs"), "teacher_logprobs",
                             pa.array(values, pa.list_(pa.float32())))
    pq.write_table(table, path)

    def patch(manifest):
        manifest["shards"][0].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    return e.edit_manifest(store, patch)


def _truncate(store: Path) -> Path:
    data = (store / "part-00003.parquet").read_bytes()
    (store / "part-00003.parquet").write_bytes(data[:-100])
    return store


def _delete(store: Path) -> Path:
    (store / "part-00000.parquet").unlink()
    return store


def resume(e: Env, out: Path, steps: int = 3) -> list[str]:
    """`train --resume` of a run of `_damaged_run` or `_finished_run` (the same settings), to `steps` steps."""
    return ["train", "--student", str(e.tiny_model), "--data", str(e.teacher_store), "--out", str(out), "--steps",
            str(steps), "--batch-size", "4", "--save-every", "1", "--resume"]


def _finished_run(e: Env, steps: int = 1, save_every: int = 0) -> Path:
    """A finished run in e.tmp/out, made with `resume`'s settings."""
    do_train(e.tiny_model, e.teacher_store, e.tmp / "out", steps=steps, batch_size=4, save_every=save_every)
    return e.tmp / "out"


def _damaged_run(e: Env, damage) -> Path:
    """A 2-step run with a checkpoint at each step, `damage(checkpoint)` done to both."""
    out = _finished_run(e, steps=2, save_every=1)
    for checkpoint in (out / "checkpoints").iterdir():
        damage(checkpoint)
    return out


def _unfinished_run(e: Env) -> Path:
    """A run killed before its final model: metrics and checkpoints, no lightopd.json."""
    out = _finished_run(e, steps=2, save_every=1)
    (out / "lightopd.json").unlink()
    return out


def _exploit(checkpoint: Path) -> None:
    state = {"step": int(checkpoint.name[5:]), "payload": Exploit(checkpoint.parent / "ran")}
    torch.save(state, checkpoint / "trainer_state.pt")


def _cursor_as_text(checkpoint: Path) -> None:
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    torch.save({**state, "cursor": str(state["cursor"])}, checkpoint / "trainer_state.pt")


@pytest.fixture
def env(tmp_path, tiny_model, plain_model, teacher_model, rollout_store, teacher_store, prompts_file) -> Env:
    return Env(tmp_path, tiny_model, plain_model, teacher_model, rollout_store, teacher_store, prompts_file)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_with_one_clear_line(case, env, monkeypatch, capsys):
    argv = case.build(env)
    before = {p for p in env.tmp.rglob("*")}
    capsys.readouterr()  # what building the case printed
    code, stdout, stderr = cli(monkeypatch, capsys, *argv)
    assert code == case.code, stderr
    assert case.word in stderr, stderr
    assert "Traceback" not in stderr
    if argv[0] != "inspect" and case.id not in USAGE:
        assert stdout == ""
        lines = stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and sum(line.startswith("error: ") for line in lines) == 1, stderr
        assert case.id in MID_RUN or not any("━" in line for line in lines), "found before any work started"
    out = env.tmp / "out"
    if out not in before:
        assert not out.exists(), "a failure before the first row leaves nothing behind"
