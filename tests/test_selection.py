"""Which tokens teach (objectives/selection.py): each selector's kept set against a hand computation on a
hand-built step, the normalisation, and in training: keeping every token changes nothing bit for bit, and
an entropy selection's loss equals a float64 reference from the student's full logits whatever the
micro-batching and chunking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from lightopd.data.spans import parse_spans
from lightopd.objectives.selection import SelectionSpec, curriculum_share, normalised, selected
from tests.helpers import do_train, metrics, read_rows, weights
from tests.reference import completion_logits, log_softmax64

LENGTHS = [5, 2, 4, 1, 3]
N = sum(LENGTHS)
same = lambda t: t  # noqa: E731  one rank: gathering and summing change nothing


def step():
    """The mask [R, T], and distinct per-position entropy and divergence values, padded with junk."""
    mask = torch.zeros(len(LENGTHS), max(LENGTHS), dtype=torch.float64)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    g = np.random.default_rng(3)
    entropy = torch.tensor(g.permutation(mask.numel()) / 10.0).reshape(mask.shape)
    divergence = torch.tensor(g.permutation(mask.numel()) / 7.0).reshape(mask.shape)
    return mask, entropy, divergence


def kept(spec, step_number=1, total=5, keys=None):
    mask, entropy, divergence = step()
    keys = keys or [f"0:{step_number}:p{i}:0" for i in range(len(LENGTHS))]
    return selected(spec, mask, step_number, total, keys, entropy, divergence, same, N).numpy()


def positions():
    """The hand-built step as numpy: real positions, entropy, divergence."""
    mask, entropy, divergence = step()
    real = mask.numpy().astype(bool)
    return real, entropy.numpy(), divergence.numpy()


def top(values, candidates, count):
    """Hand: 1 on the `count` largest values among the candidates."""
    order = sorted(((v, i) for i, v in np.ndenumerate(values) if candidates[i]), reverse=True)[:count]
    out = np.zeros(values.shape)
    for _, i in order:
        out[i] = 1
    return out


@pytest.mark.parametrize("keep", [0.3, 0.5, 1.0])
def test_student_selectors_keep_the_hand_computed_sets(keep):
    real, entropy, divergence = positions()
    count = math.ceil(keep * N)
    np.testing.assert_array_equal(kept(SelectionSpec(token_select="entropy", token_keep=keep)),
                                  top(entropy, real, count))
    np.testing.assert_array_equal(kept(SelectionSpec(token_select="divergence", token_keep=keep)),
                                  top(divergence, real, count))
    low = real & (entropy < np.median(entropy[real]))  # N is odd: the middle value
    share = min(keep, 0.3)  # confident-wrong's share is of all positions, taken from the lower half
    np.testing.assert_array_equal(kept(SelectionSpec(token_select="confident-wrong", token_keep=share)),
                                  top(divergence, low, math.ceil(share * N)))
    tip = np.maximum(top(entropy, real, count), top(divergence, low, math.ceil(0.2 * N)))
    np.testing.assert_array_equal(kept(SelectionSpec(token_select="tip", token_keep=keep, token_low_keep=0.2)), tip)


def test_position_and_curriculum_keep_each_rows_first_or_last_tokens():
    real, *_ = positions()

    def first(share, from_end=False):
        out = np.zeros(real.shape)
        for i, n in enumerate(LENGTHS):
            k = math.ceil(share * n)
            if from_end:
                out[i, n - k:n] = 1
            else:
                out[i, :k] = 1
        return out

    np.testing.assert_array_equal(kept(SelectionSpec(token_select="position", token_keep=0.3)), first(0.3))
    np.testing.assert_array_equal(kept(SelectionSpec(token_select="position", token_keep=0.3, token_from="end")),
                                  first(0.3, True))
    linear = [0.2 + 0.8 * (s - 1) / 4 for s in range(1, 6)]  # 0.2 at step 1 .. 1 at step 5 of 5
    for s, share in zip(range(1, 6), linear, strict=True):
        spec = SelectionSpec(token_select="curriculum", token_keep=0.2)
        assert curriculum_share(spec, s, 5) == pytest.approx(share)
        np.testing.assert_array_equal(kept(spec, s, 5), first(share))
    stepwise = SelectionSpec(token_select="curriculum", token_keep=0.2, token_schedule="step", token_stages=2)
    assert [curriculum_share(stepwise, s, 5) for s in range(1, 6)] == [0.2, 0.2, 1.0, 1.0, 1.0]


def test_random_is_keyed_by_seed_step_and_row_not_by_batching():
    spec = SelectionSpec(token_select="random", token_keep=0.5)
    keys = [f"0:3:p{i}:0" for i in range(len(LENGTHS))]
    a = kept(spec, 3, keys=keys)
    b = kept(spec, 3, keys=keys)
    np.testing.assert_array_equal(a, b)
    assert 0 < a.sum() < N and (a <= positions()[0]).all()
    other = kept(spec, 3, keys=[f"1:3:p{i}:0" for i in range(len(LENGTHS))])  # another seed
    assert (other != a).any()
    # a row's draws depend on its own key alone: the same rows in another order keep the same positions
    mask, *_ = step()
    order = [2, 0, 4, 1, 3]
    shuffled = selected(spec, mask[order], 3, 5, [keys[i] for i in order], None, None, same, N).numpy()
    np.testing.assert_array_equal(shuffled, a[order] * mask[order].numpy())


def test_normalisation_divides_by_kept_or_by_all():
    chosen = torch.tensor(kept(SelectionSpec(token_select="entropy", token_keep=0.4)))
    n_kept = float(chosen.sum())
    np.testing.assert_allclose(normalised(chosen, "kept", N, same).numpy(), chosen.numpy() * N / n_kept)
    np.testing.assert_array_equal(normalised(chosen, "all", N, same).numpy(), chosen.numpy())


def test_keeping_every_token_is_bit_identical(consistent_student, teacher_store, tmp_path):
    """`all` adds no arithmetic; `position` and `random` keeping everything multiply by exactly 1."""
    runs = {"all": {}, "position": {"token_select": "position", "token_keep": 1.0},
            "random": {"token_select": "random", "token_keep": 1.0}}
    for name, flags in runs.items():
        do_train(consistent_student, teacher_store, tmp_path / name, objective="jsd", steps=2, batch_size=8,
                 loss_chunk_tokens=7, **flags)
    base, base_weights = metrics(tmp_path / "all"), weights(tmp_path / "all")
    for name in ("position", "random"):
        got = metrics(tmp_path / name)
        assert [m["loss"] for m in got] == [m["loss"] for m in base] and got[0]["kept_fraction"] == 1.0
        for key, value in weights(tmp_path / name).items():
            assert torch.equal(value, base_weights[key]), (name, key)
    assert "kept_fraction" not in base[0]


@pytest.mark.parametrize("micro_batch_tokens,loss_chunk_tokens", [(100_000, 1024), (24, 5)])
def test_entropy_selection_loss_matches_a_float64_reference(consistent_student, teacher_store, tmp_path,
                                                           micro_batch_tokens, loss_chunk_tokens):
    """lightning-opd on the top 40% of the step's positions by the student's entropy: the step's loss
    (the mean over kept positions) from a float64 forward of every row, whatever the batching."""
    rows = read_rows(teacher_store)
    model = AutoModelForCausalLM.from_pretrained(consistent_student, dtype=torch.float64).eval()
    entropy, loss = [], []
    for row in rows:
        lp = log_softmax64(completion_logits(model, row["prompt_ids"], row["completion_ids"]))
        lq = lp[np.arange(len(row["completion_ids"])), row["completion_ids"]]
        entropy += list(-(np.exp(lp) * lp).sum(-1))
        loss += list(-(np.array(row["teacher_logprobs"]) - lq) * lq)  # lightning-opd's per-token value
    entropy, loss = np.array(entropy), np.array(loss)
    count = math.ceil(0.4 * len(entropy))
    ordered = np.sort(entropy)[::-1]
    assert ordered[count - 1] - ordered[count] > 1e-4, "no near-tie at the threshold (float32 could reorder it)"
    chosen = entropy >= ordered[count - 1]
    out = tmp_path / "run"
    do_train(consistent_student, teacher_store, out, objective="lightning-opd", steps=1, batch_size=len(rows),
             token_select="entropy", token_keep=0.4, micro_batch_tokens=micro_batch_tokens,
             loss_chunk_tokens=loss_chunk_tokens)
    first = metrics(out)[0]
    assert first["kept_fraction"] == pytest.approx(count / len(entropy))
    assert first["loss"] == pytest.approx(loss[chosen].mean(), rel=1e-4, abs=1e-6)
    assert first["kept_student_entropy"] == pytest.approx(entropy[chosen].mean(), rel=1e-4)
    assert first["dropped_student_entropy"] == pytest.approx(entropy[~chosen].mean(), rel=1e-4)


@pytest.mark.parametrize("flags", [{"token_select": "position", "token_keep": 0.3},
                                   {"token_select": "curriculum", "token_keep": 0.2, "token_from": "end"},
                                   {"token_select": "random", "token_keep": 0.5, "token_norm": "all"}])
def test_dropped_positions_skip_the_output_layer_and_change_nothing(consistent_student, teacher_store, tmp_path,
                                                                    monkeypatch, flags):
    """A selection known before the forward runs the output layer on the kept positions alone: the
    same loss, kept statistics and update as computing every position and weighting the dropped ones 0."""
    from lightopd.training.trainer import Trainer

    for skip in (True, False):
        monkeypatch.setattr(Trainer, "skips_dropped", skip)
        do_train(consistent_student, teacher_store, tmp_path / str(skip), objective="rkl", steps=2, batch_size=8,
                 loss_chunk_tokens=7, lr=1e-3, **flags)
    skipped, full = metrics(tmp_path / "True"), metrics(tmp_path / "False")
    assert skipped[0]["kept_fraction"] < 1
    for a, b in zip(skipped, full, strict=True):
        assert 0 < a["kept_fraction"] == b["kept_fraction"] <= 1
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["kept_student_entropy"] == pytest.approx(b["kept_student_entropy"], rel=1e-5)
        assert a["student_entropy"] == pytest.approx(b["kept_student_entropy"], rel=1e-5)  # means over what ran
        assert "dropped_student_entropy" not in a and "dropped_student_entropy" in b
    a, b = weights(tmp_path / "True"), weights(tmp_path / "False")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=5e-5, rtol=0)


def test_decay_weighs_each_position_by_a_half_life():
    """`decay`: 2^(−t / h) at a row's t-th token (from the start, or the end), h = max(1, keep·|y|); no
    position dropped; `kept` normalisation makes the weights average 1 over the step's positions."""
    mask, *_ = step()
    spec = SelectionSpec(token_select="decay", token_keep=0.4)
    got = selected(spec, mask, 1, 5, [], None, None, same, N).numpy()
    want = np.zeros(mask.shape)
    for i, n in enumerate(LENGTHS):
        want[i, :n] = [0.5 ** (t / max(1.0, 0.4 * n)) for t in range(n)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    end = selected(SelectionSpec(token_select="decay", token_keep=0.4, token_from="end"), mask, 1, 5, [], None, None,
                   same, N).numpy()
    for i, n in enumerate(LENGTHS):
        np.testing.assert_allclose(end[i, :n], want[i, :n][::-1], rtol=1e-12)
    weights_kept = normalised(torch.tensor(got), "kept", N, same).numpy()
    assert weights_kept.sum() == pytest.approx(N) and (weights_kept[mask.numpy() == 0] == 0).all()


def test_spans_keep_the_marked_tokens_of_the_chosen_kinds():
    mask, *_ = step()
    raw = [[[0, 2, "key"], {"start": 3, "end": 5, "kind": "error"}], [[1, 2]], [], [[0, 1, "key"]], [[0, 3, "error"]]]
    spans = [parse_spans(value, f"row {i}", n) for i, (value, n) in enumerate(zip(raw, LENGTHS, strict=True))]
    want = np.zeros(mask.shape)
    want[0, 0:2] = want[0, 3:5] = want[1, 1:2] = want[3, 0:1] = want[4, 0:3] = 1
    np.testing.assert_array_equal(selected(SelectionSpec(token_select="spans"), mask, 1, 5, [], None, None, same, N,
                                           spans).numpy(), want)
    only_key = selected(SelectionSpec(token_select="spans", token_span_kinds="key"), mask, 1, 5, [], None, None, same,
                        N, spans).numpy()
    want_key = np.zeros(mask.shape)
    want_key[0, 0:2] = want_key[3, 0:1] = 1
    np.testing.assert_array_equal(only_key, want_key)
    for value, why in (([[0, 9]], "not within the completion's 5 tokens"), ("0-2", "not a list"), ([[1]], "a span")):
        with pytest.raises(ValueError, match=why):
            parse_spans(value, "row 0", 5)


def test_spans_from_row_metadata_in_training(tiny_model, teacher_model, tmp_path, monkeypatch, capsys):
    from tests.helpers import cli, do_rollout, do_score, write_jsonl

    records = [{"id": f"p{i}", "prompt": f"w{i} w{i + 1}", "spans": [[0, 1, "key"]]} for i in range(6)]
    do_rollout(tiny_model, write_jsonl(tmp_path / "p.jsonl", records), tmp_path / "r", n=2, max_new_tokens=6)
    do_score(teacher_model, tmp_path / "r", tmp_path / "t", top_k=4)
    rows = read_rows(tmp_path / "t")
    base = ["train", "--student", str(tiny_model), "--data", str(tmp_path / "t"), "--objective", "rkl", "--steps", "1",
            "--batch-size", "12", "--allow-teacher-mismatch", "--token-select", "spans"]
    code, _, err = cli(monkeypatch, capsys, *base, "--out", str(tmp_path / "o"), "--token-span-kinds", "key")
    assert code == 0, err
    tokens = sum(len(r["completion_ids"]) for r in rows)
    assert metrics(tmp_path / "o")[0]["kept_fraction"] == pytest.approx(len(rows) / tokens)  # one token per row
    code, _, err = cli(monkeypatch, capsys, *base, "--out", str(tmp_path / "x"), "--token-spans", "marks")
    assert code == 2 and "metadata field 'marks' is missing" in err
