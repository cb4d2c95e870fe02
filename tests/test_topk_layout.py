"""Top-k encodings of a teacher store (data/topk_layout.py): significand rounding against a hand
formula, the id order read back as the descending one, and every encoding training to the
float32 store's step-1 loss within 0.5% at a card's sampling settings."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from lightopd.data.store import open_store
from lightopd.data.topk_layout import by_id, descending, round_significand
from tests.helpers import do_score, do_train, metrics, read_rows


def test_significand_rounding_matches_a_hand_formula():
    rng = np.random.default_rng(0)
    values = np.concatenate([-np.exp(rng.uniform(-12, 3, 4000)), -rng.uniform(0, 2 ** -14, 200),  # subnormals
                             [0.0, -0.0]]).astype(np.float16)
    exact = values.astype(np.float64)
    for bits in (11, 9, 8, 7, 4):
        exponent = np.floor(np.log2(np.maximum(np.abs(exact), 2.0 ** -14)))  # subnormals: float16's smallest
        step = 2.0 ** (exponent - bits + 1)
        want = np.sign(exact) * np.floor(np.abs(exact) / step + 0.5) * step  # nearest, ties away from zero
        got = round_significand(values, bits).astype(np.float64)
        np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float64), err_msg=f"{bits} bits")
        assert np.all(np.abs(got - exact) <= 2.0 ** -bits * np.abs(exact) + 2.0 ** (-14 - bits))  # (subnormals)
    assert np.isneginf(round_significand(np.array([-np.inf], dtype=np.float16), 8)).all()
    assert round_significand(np.array([-65504.0], dtype=np.float16), 8)[0] == -65280.0  # not -inf
    far = round_significand(np.array([-65500.0], dtype=np.float32), 7, limit=65504.0).astype(np.float16)
    assert far[0] == -65024.0  # (nearest, -65536, is beyond float16's range)
    wide = rng.normal(0, 3, 1000).astype(np.float32)  # float32 (the entropy column): 24 bits, rounded to 11
    step = 2.0 ** (np.floor(np.log2(np.abs(wide.astype(np.float64)))) - 10)
    want = np.sign(wide) * np.floor(np.abs(wide.astype(np.float64)) / step + 0.5) * step
    np.testing.assert_array_equal(round_significand(wide, 11).astype(np.float64), want)


def test_id_order_is_the_descending_order_rearranged():
    rng = np.random.default_rng(1)
    lps = -np.sort(rng.exponential(3, (500, 12)), axis=1)  # distinct, descending
    ids = np.stack([rng.choice(5000, 12, replace=False) for _ in range(500)])
    stored_ids, stored_lps = by_id(ids, lps)
    assert (stored_ids[:, 0] == ids[:, 0]).all() and (np.diff(stored_ids[:, 1:], axis=1) > 0).all()
    back_ids, back_lps = descending(stored_ids, stored_lps)
    np.testing.assert_array_equal(back_ids, ids)
    np.testing.assert_array_equal(back_lps, lps)


def _pairs(row, k):
    ids, lps = np.array(row["topk_ids"]).reshape(-1, k), np.array(row["topk_logprobs"]).reshape(-1, k)
    return [sorted(zip(i.tolist(), p.tolist(), strict=True)) for i, p in zip(ids, lps, strict=True)]


def test_an_id_ordered_store_reads_as_the_descending_one(teacher_model, card_rollouts, tmp_path):
    k = 6
    do_score(teacher_model, card_rollouts, tmp_path / "lp", top_k=k, topk_order="logprob")
    do_score(teacher_model, card_rollouts, tmp_path / "id", top_k=k)  # the default
    manifest = open_store(tmp_path / "id")
    assert manifest["scoring"]["topk_order"] == "id" and manifest["scoring"]["topk_bits"] == 7
    assert manifest["scoring"]["entropy_bits"] == 11
    raw = pq.read_table(tmp_path / "id" / manifest["shards"][0]["name"], columns=["topk_ids"]).column(0).to_pylist()
    on_disk = np.array([i for row in raw for i in row]).reshape(-1, k)
    assert (np.diff(on_disk[:, 1:], axis=1) > 0).all()  # on disk: the argmax, then by id
    for a, b in zip(read_rows(tmp_path / "lp"), read_rows(tmp_path / "id"), strict=True):
        assert _pairs(a, k) == _pairs(b, k)  # the same (id, log-prob) pairs
        lps = np.array(b["topk_logprobs"]).reshape(-1, k)
        assert (np.diff(lps, axis=1) <= 0).all()  # read back descending
        np.testing.assert_array_equal(np.array(a["topk_ids"]).reshape(-1, k)[:, 0],
                                      np.array(b["topk_ids"]).reshape(-1, k)[:, 0])  # the teacher's argmax first
    from lightopd.data.reader import iter_batches

    alone = [r for batch in iter_batches(tmp_path / "id", columns=["topk_ids"]) for r in batch.to_pylist()]
    assert [r["topk_ids"] for r in alone] == [r["topk_ids"] for r in read_rows(tmp_path / "id")]
    assert set(alone[0]) == {"topk_ids"}


def test_fewer_bits_are_the_float32_values_rounded_once(teacher_model, card_rollouts, tmp_path):
    do_score(teacher_model, card_rollouts, tmp_path / "f32", top_k=6, topk_order="logprob", topk_dtype="float32",
             topk_bits=11)
    do_score(teacher_model, card_rollouts, tmp_path / "b8", top_k=6, topk_order="logprob", topk_bits=8)
    for a, b in zip(read_rows(tmp_path / "f32"), read_rows(tmp_path / "b8"), strict=True):
        exact = np.array(a["topk_logprobs"], dtype=np.float32)
        want = round_significand(exact, 8).astype(np.float16)
        np.testing.assert_array_equal(np.array(b["topk_logprobs"], dtype=np.float16), want)
        assert (np.abs(want.astype(np.float64) - exact) <= 2.0**-8 * np.abs(exact) + 2.0**-25).all()
        assert a["topk_ids"] == b["topk_ids"] and a["teacher_log_tail"] == b["teacher_log_tail"]


@pytest.mark.parametrize("objective", ["rkl", "fkl", "jsd", "taid", "vopd"])
def test_every_encoding_trains_to_the_float32_step_one_loss(objective, teacher_model, consistent_student,
                                                            card_rollouts, tmp_path):
    """A confident-enough tiny teacher at T = 0.6, top-p 0.95, top-k 20, k = 6 < V."""
    encodings = {"float32": {"topk_dtype": "float32", "topk_order": "logprob", "topk_bits": 11},
                 "float16": {"topk_order": "logprob", "topk_bits": 11}, "by-id": {"topk_bits": 11},
                 "8-bits": {"topk_bits": 8}, "7-bits (the default)": {}}
    losses = {}
    for name, options in encodings.items():
        do_score(teacher_model, card_rollouts, tmp_path / name, top_k=6, **options)
        do_train(consistent_student, tmp_path / name, tmp_path / f"run-{name}", objective=objective, steps=1,
                 batch_size=16, allow_off_policy=True, allow_teacher_mismatch=True)
        losses[name] = metrics(tmp_path / f"run-{name}")[0]["loss"]
    for name, loss in losses.items():
        assert loss == pytest.approx(losses["float32"], rel=5e-3), name
    assert losses["by-id"] == pytest.approx(losses["float16"], rel=1e-6)  # the same values, in another order
