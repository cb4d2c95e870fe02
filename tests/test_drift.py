"""How stale a store has become, in every metrics line: the importance weights w = exp(lq_y − ℓold)
of the student against the rollout model, their effective sample size and the k3 estimate of
KL(π_old ‖ π_θ), against a float64 forward of a student that is not the rollout model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import do_train, metrics, read_rows
from tests.reference import completion_logits, log_softmax64


def test_drift_measures_match_a_float64_reference(teacher_model, teacher_store, tmp_path):
    rows = read_rows(teacher_store)
    model = AutoModelForCausalLM.from_pretrained(teacher_model, dtype=torch.float64).eval()
    log_w = []
    for row in rows:
        lp = log_softmax64(completion_logits(model, row["prompt_ids"], row["completion_ids"]))
        lq = lp[np.arange(len(row["completion_ids"])), row["completion_ids"]]
        log_w += list(lq - np.array(row["behavior_logprobs"]))  # an untruncated store: ℓold is ℓμ
    w = np.exp(np.array(log_w))
    assert w.max() / w.min() > 10, "the student should be far from the rollout model"
    do_train(teacher_model, teacher_store, tmp_path / "run", objective="rkl", steps=1, batch_size=len(rows),
             allow_off_policy=True, allow_teacher_mismatch=True, loss_chunk_tokens=7, micro_batch_tokens=50)
    first = metrics(tmp_path / "run")[0]
    assert first["is_ratio_mean"] == pytest.approx(w.mean(), rel=1e-4)
    assert first["is_ess"] == pytest.approx(w.sum() ** 2 / (len(w) * (w ** 2).sum()), rel=1e-4)
    assert first["rollout_kl"] == pytest.approx((w - 1 - np.log(w)).mean(), rel=1e-4)
    assert "is_ratio_sq" not in first


def test_a_student_that_sampled_the_store_has_not_drifted(consistent_student, teacher_store, tmp_path):
    do_train(consistent_student, teacher_store, tmp_path / "run", objective="rkl", steps=2, batch_size=8, lr=1e-2)
    first, second = metrics(tmp_path / "run")
    assert first["is_ess"] == pytest.approx(1.0, abs=1e-5) and first["rollout_kl"] == pytest.approx(0.0, abs=1e-5)
    assert second["is_ess"] < 1 and second["rollout_kl"] > 0  # the update moved it off its rollouts
