"""Spans and a loss per span kind (data/spans.py, objectives/span_losses.py): character offsets map to
the tokens they overlap; a step routed over three losses equals a float64 reference computed by hand
from the student's full logits; spans from a file of annotations; the anneal; bad spans are exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightopd.data.spans import character_spans_to_tokens
from lightopd.errors import InputError
from lightopd.objectives.selection import span_loss_entry
from tests.helpers import cli, do_rollout, do_score, do_train, metrics, read_rows, write_jsonl
from tests.reference import completion_logits, log_softmax64

PIECES = ["The", " cat", "", " sa", "t", " é", "\u0301", " on", "", " it", "."]  # "" is a token with no text


def overlapping(pieces, start, end):
    """Hand: the indices of the pieces holding any character of [start, end) of their concatenation."""
    out, at = [], 0
    for i, piece in enumerate(pieces):
        if piece and at < end and start < at + len(piece):
            out.append(i)
        at += len(piece)
    return out


@pytest.mark.parametrize("start,end", [(0, 3), (2, 5), (3, 7), (7, 9), (9, 12), (12, 18), (0, 21), (20, 21)])
def test_character_spans_become_the_tokens_they_overlap(start, end):
    text = "".join(PIECES)
    ids = list(range(len(PIECES)))
    decode = lambda chosen: "".join(PIECES[i] for i in chosen)  # noqa: E731
    (first, last, kind), = character_spans_to_tokens([(start, end, "key")], ids, decode)
    want = overlapping(PIECES, start, end)
    assert kind == "key" and end <= len(text)
    assert list(range(first, last)) == list(range(want[0], want[-1] + 1))
    assert all(PIECES[i] == "" for i in range(first, last) if i not in want)  # only empty tokens between


def test_span_loss_entries_are_checked():
    assert span_loss_entry("key=fkl:0.5") == ("key", "fkl", 0.5)
    assert span_loss_entry("error-1=rkl") == ("error-1", "rkl", 1.0)
    for bad in ("key", "=fkl", "other=fkl", "a/b=fkl", "key=fkl:x", "key=fkl:-1"):
        with pytest.raises(InputError, match="--span-loss"):
            span_loss_entry(bad)


def holding(at, start, end, kind):
    """Hand: the token span holding any character of [start, end), given each token's first character."""
    held = [t for t in range(len(at) - 1) if at[t] < at[t + 1] and at[t] < end and start < at[t + 1]]
    return (min(held), max(held) + 1, kind) if held else (0, 0, kind)


def annotate(rows, path, units="tokens", decode=None):
    """A file of annotations: key and error spans that differ per sample and overlap in places; returns
    {(prompt_id, sample_index): [(start, end, kind)]} in tokens. With `decode`, the spans are taken
    through characters: written as character offsets (`units` characters), or as the tokens that hold
    any of their characters, found by a plain scan (`units` tokens)."""
    spans, lines = {}, []
    for row in rows:
        n, j = len(row["completion_ids"]), row["sample_index"]
        mine = [(0, min(n, 2 + j), "key"), (max(0, n - 3), n, "error"), (1, min(n, 3), "error")]
        if decode is not None:
            at = [len(decode(row["completion_ids"][:i])) for i in range(n + 1)]  # each token's first character
            mine = [(at[a], at[b], k) for a, b, k in mine]
            if units == "tokens":
                mine = [holding(at, a, b, k) for a, b, k in mine]
        spans[(row["prompt_id"], j)] = mine
        lines.append(json.dumps({"prompt_id": row["prompt_id"], "sample_index": j, "marks": [list(s) for s in mine]}))
    path.write_text("\n".join(lines) + "\n")
    return spans


@pytest.mark.parametrize("sampled", [None, {"temperature": 0.6, "top_p": 0.95, "top_k": 20}])
def test_a_loss_per_span_kind_matches_a_float64_reference(consistent_student, teacher_store, tiny_model,
                                                          teacher_model, tmp_path, sampled):
    """--objective lightning-opd, key spans fkl (weight 0.5, top-k plus tail), error spans sft (weight 2):
    each position's loss by hand from float64 logits at the store's temperature (every route takes
    --objective's τ, sft's too); a position in both kinds' spans is key's."""
    tau, store = 1.0, teacher_store
    if sampled is not None:  # a card's sampling settings: every route at τ = 0.6
        records = [{"id": f"p{i}", "prompt": f"w{i} w{i + 3} w{i % 4}"} for i in range(8)]
        do_rollout(tiny_model, write_jsonl(tmp_path / "p.jsonl", records), tmp_path / "r", n=2, max_new_tokens=10,
                   **sampled)
        do_score(teacher_model, tmp_path / "r", tmp_path / "t", top_k=6)
        tau, store = sampled["temperature"], tmp_path / "t"
    rows = read_rows(store)
    spans = annotate(rows, tmp_path / "marks.jsonl")
    model = AutoModelForCausalLM.from_pretrained(consistent_student, dtype=torch.float64).eval()
    total, parts, counts = 0.0, {"key": 0.0, "error": 0.0, "other": 0.0}, {"key": 0, "error": 0, "other": 0}
    for row in rows:
        ids = row["completion_ids"]
        lp = log_softmax64(completion_logits(model, row["prompt_ids"], ids) / tau)
        top_ids = np.array(row["topk_ids"]).reshape(len(ids), -1)  # stored flat, k per position
        top_lps = np.array(row["topk_logprobs"], dtype=np.float64).reshape(len(ids), -1)
        for t, y in enumerate(ids):
            kinds = [k for a, b, k in spans[(row["prompt_id"], row["sample_index"])] if a <= t < b]
            kind = "key" if "key" in kinds else ("error" if "error" in kinds else "other")
            lq = lp[t, y]
            if kind == "key":
                top = top_ids[t]
                p, q = top_lps[t], lp[t, top]
                p_rest, q_rest = row["teacher_log_tail"][t], np.log(np.exp(np.delete(lp[t], top)).sum())
                value = 0.5 * ((np.exp(p) * (p - q)).sum() + np.exp(p_rest) * (p_rest - q_rest))
            elif kind == "error":
                value = 2.0 * -lq
            else:
                value = -(row["teacher_logprobs"][t] - lq) * lq
            total, parts[kind], counts[kind] = total + value, parts[kind] + value, counts[kind] + 1
    tokens = sum(counts.values())
    assert min(counts.values()) > 0
    out = tmp_path / "run"
    do_train(consistent_student, store, out, objective="lightning-opd", steps=1, batch_size=len(rows),
             span_loss=("key=fkl:0.5", "error=sft:2"), token_spans="marks",
             token_spans_file=str(tmp_path / "marks.jsonl"), micro_batch_tokens=24, loss_chunk_tokens=5)
    first = metrics(out)[0]
    assert first["loss"] == pytest.approx(total / tokens, rel=1e-4)
    for kind in parts:
        assert first[f"span_frac/{kind}"] == pytest.approx(counts[kind] / tokens)
        assert first[f"span_loss/{kind}"] == pytest.approx(parts[kind] / tokens, rel=1e-4, abs=1e-7)
    provenance = json.loads((out / "lightopd.json").read_text())
    assert provenance["objective"]["name"] == "lightning-opd+key=fkl+error=sft"


def test_character_spans_train_as_their_tokens_and_the_anneal(consistent_student, teacher_store, tmp_path):
    """The same spans in character offsets give the same loss as in token offsets; --span-anneal 2
    weighs the span losses 1 then 0.5, reported as span_anneal."""
    rows = read_rows(teacher_store)
    tokenizer = AutoTokenizer.from_pretrained(consistent_student)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    for units in ("tokens", "characters"):
        annotate(rows, tmp_path / f"{units}.jsonl", units, decode)
        do_train(consistent_student, teacher_store, tmp_path / units, objective="rkl", steps=2, batch_size=8,
                 span_loss=("key=fkl", "error=sft"), token_spans="marks", token_spans_file=str(tmp_path /
                                                                                                f"{units}.jsonl"),
                 token_span_units=units, span_anneal=2)
    by_tokens, by_characters = metrics(tmp_path / "tokens"), metrics(tmp_path / "characters")
    assert [m["span_anneal"] for m in by_tokens] == [1.0, 0.5]
    for a, b in zip(by_tokens, by_characters, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["span_frac/key"] == pytest.approx(b["span_frac/key"])


def test_bad_spans_are_exit_2_naming_the_row(consistent_student, teacher_store, tmp_path, monkeypatch, capsys):
    rows = read_rows(teacher_store)
    annotate(rows[1:], tmp_path / "some.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"prompt_id": "p0", "sample_index": 0, "marks": []}\nnot json\n')
    base = ["train", "--student", str(consistent_student), "--data", str(teacher_store), "--steps", "1",
            "--batch-size", str(len(rows)), "--objective", "rkl", "--span-loss", "key=fkl", "--token-spans", "marks"]
    first = rows[0]
    for i, (extra, message) in enumerate((
            (["--token-spans-file", str(tmp_path / "some.jsonl")],
             f"prompt {first['prompt_id']!r} sample {first['sample_index']} is not annotated"),
            (["--token-spans-file", str(tmp_path / "broken.jsonl")], "broken.jsonl line 2: not JSON"),
            ([], "metadata field 'marks' is missing"),
            (["--span-loss", "bad=nope"], "unknown objective"),
            (["--span-loss", "key=rkl"], "key is listed twice"),
            (["--span-anneal", "0"], "--span-anneal: must be >= 1"))):
        code, _, err = cli(monkeypatch, capsys, *base, *extra, "--out", str(tmp_path / f"o{i}"))
        assert code == 2 and message in err, (extra, err)


def test_the_anneal_resumes_where_it_stopped(consistent_student, teacher_store, tmp_path):
    """The anneal's clock is saved in checkpoints: a run resumed at step 2 weighs step 3 as one never stopped."""
    rows = read_rows(teacher_store)
    annotate(rows, tmp_path / "marks.jsonl")
    flags = dict(objective="rkl", batch_size=8, span_loss=("key=fkl",), token_spans="marks",
                 token_spans_file=str(tmp_path / "marks.jsonl"), span_anneal=4, save_every=1)
    do_train(consistent_student, teacher_store, tmp_path / "whole", steps=3, **flags)
    do_train(consistent_student, teacher_store, tmp_path / "cut", steps=2, **flags)
    do_train(consistent_student, teacher_store, tmp_path / "cut", steps=3, resume=True, **flags)
    whole, cut = metrics(tmp_path / "whole"), metrics(tmp_path / "cut")
    assert [m["span_anneal"] for m in whole] == [1.0, 0.75, 0.5] == [m["span_anneal"] for m in cut]
    assert cut[-1]["loss"] == pytest.approx(whole[-1]["loss"], rel=1e-5)
