"""How stale a store has become, in every metrics line: the importance weights w = exp(lq_y − ℓold)
of the student against the rollout model, their effective sample size and the k3 estimate of
KL(π_old ‖ π_θ), against a float64 forward of a student that is not the rollout model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import do_rollout, do_score, do_train, metrics, read_rows, write_jsonl
from tests.reference import completion_logits, log_softmax64


@pytest.mark.parametrize("sampled", [None, {"temperature": 0.6, "top_p": 0.95, "top_k": 20}])
def test_drift_measures_match_a_float64_reference(teacher_model, teacher_store, tiny_model, tmp_path, sampled):
    """At T = 1 untruncated (ℓold is ℓμ) and at a card's settings (ℓold the stored untruncated softmax at
    T = 0.6, the student's log-probs at τ = 0.6)."""
    tau, store = 1.0, teacher_store
    if sampled is not None:
        records = [{"id": f"p{i}", "prompt": f"w{i} w{i + 3} w{i % 4}"} for i in range(8)]
        do_rollout(tiny_model, write_jsonl(tmp_path / "p.jsonl", records), tmp_path / "r", n=2, max_new_tokens=10,
                   **sampled)
        do_score(teacher_model, tmp_path / "r", tmp_path / "t", top_k=6)
        tau, store = sampled["temperature"], tmp_path / "t"
    rows = read_rows(store)
    model = AutoModelForCausalLM.from_pretrained(teacher_model, dtype=torch.float64).eval()
    log_w = []
    for row in rows:
        lp = log_softmax64(completion_logits(model, row["prompt_ids"], row["completion_ids"]) / tau)
        lq = lp[np.arange(len(row["completion_ids"])), row["completion_ids"]]
        old = row["behavior_logprobs"] if sampled is None else row["policy_logprobs"]  # untruncated: ℓold is ℓμ
        log_w += list(lq - np.array(old))
    w = np.exp(np.array(log_w))
    assert w.max() / w.min() > 10, "the student should be far from the rollout model"
    do_train(teacher_model, store, tmp_path / "run", objective="rkl", steps=1, batch_size=len(rows),
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


def test_stop_when_ends_the_run_and_a_killed_one_stops_at_the_same_step(consistent_student, teacher_store,
                                                                        tmp_path):
    """--stop-when ends at the first step whose metric crosses, writing the model of that step; it
    writes no checkpoint there, so a run killed before its model resumes and stops at the same step."""
    import shutil

    from tests.helpers import weights

    flags = dict(objective="rkl", steps=10, batch_size=8, lr=1e-2, save_every=1, stop_when="rollout_kl>1e-3")
    result, _ = do_train(consistent_student, teacher_store, tmp_path / "run", **flags)
    lines = metrics(tmp_path / "run")
    stopped = result["steps"]
    assert 1 < stopped < 10 and [m["step"] for m in lines] == list(range(1, stopped + 1))
    assert lines[-1]["rollout_kl"] > 1e-3 and all(m["rollout_kl"] <= 1e-3 for m in lines[:-1])
    kept = sorted(int(p.name[5:]) for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert kept == list(range(1, stopped))
    shutil.copytree(tmp_path / "run", tmp_path / "cut")
    for name in ("model.safetensors", "lightopd.json"):  # killed before its final model was written
        (tmp_path / "cut" / name).unlink()
    again, _ = do_train(consistent_student, teacher_store, tmp_path / "cut", resume=True, **flags)
    assert again["steps"] == stopped
    a, b = weights(tmp_path / "run"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stop_window_reads_the_mean_of_the_last_steps_and_resumes_alike(consistent_student, teacher_store,
                                                                         tmp_path):
    """--stop-window 3 stops at the first step whose last 3 steps' mean rollout_kl crosses (computed by hand
    from a run without a rule); a run killed after its last checkpoint resumes with the window of the
    steps it kept and stops at the same step."""
    import shutil

    from tests.helpers import weights

    flags = dict(objective="rkl", steps=10, batch_size=8, lr=1e-2, save_every=1)
    do_train(consistent_student, teacher_store, tmp_path / "free", **flags)
    kl = [m["rollout_kl"] for m in metrics(tmp_path / "free")]
    means = {t: sum(kl[t - 3:t]) / 3 for t in range(3, 11)}
    threshold = means[6] * (1 - 1e-6)
    want = min(t for t, m in means.items() if m > threshold)
    assert 3 <= want <= 6 and kl[want - 1] != means[want]
    result, _ = do_train(consistent_student, teacher_store, tmp_path / "run", stop_when=f"rollout_kl>{threshold!r}",
                         stop_window=3, **flags)
    assert result["steps"] == want
    shutil.copytree(tmp_path / "run", tmp_path / "cut")
    for name in ("model.safetensors", "lightopd.json"):  # killed after step want − 1's checkpoint
        (tmp_path / "cut" / name).unlink()
    again, _ = do_train(consistent_student, teacher_store, tmp_path / "cut", resume=True,
                        stop_when=f"rollout_kl>{threshold!r}", stop_window=3, **flags)
    assert again["steps"] == want
    a, b = weights(tmp_path / "run"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stop_rule_window_by_hand():
    from lightopd.errors import InputError
    from lightopd.stopping import StopRule

    rule = StopRule("is_ess<0.5", window=3, earlier=[{"is_ess": 0.9}, {"is_ess": None}])
    assert not rule.crossed({"is_ess": 0.1}) and rule.value is None  # two values of three (a null one skipped)
    assert rule.crossed({"is_ess": 0.3})  # (0.9 + 0.1 + 0.3) / 3 < 0.5
    assert rule.value == pytest.approx(1.3 / 3)
    assert not StopRule("is_ess<0.5", window=1).crossed({"is_ess": 0.5})
    with pytest.raises(InputError, match="no 'kl'"):
        StopRule("kl>1").crossed({"is_ess": 1.0})
