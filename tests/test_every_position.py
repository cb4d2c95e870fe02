"""Every position teaches: on a confident student whose top-p nucleus mostly holds one token, with a
teacher that disagrees, lightning-opd, opd-seq and rkl give a gradient at every completion position
(the student's policy is its full softmax, never the sampler's truncation), and a training step
reports the sampler's single-token share and kept mass."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from lightopd import objectives as O
from lightopd.objectives.stats import logprob_stats
from lightopd.tiny import make_model
from tests.helpers import cli, do_rollout, do_score, do_train, metrics, read_rows, write_jsonl
from tests.reference import completion_logits

T, TOP_P, K = 0.6, 0.95, 5


@pytest.fixture(scope="module")
def world(tmp_path_factory, teacher_model):
    """(student, teacher store rows) for a confident student sampled at T 0.6, top-p 0.95."""
    tmp = tmp_path_factory.mktemp("confident")
    student = make_model(tmp / "student", seed=11, logit_scale=120.0)
    words = [f"w{i}" for i in range(40)]
    prompts = write_jsonl(tmp / "p.jsonl", [{"id": f"p{i}", "prompt": " ".join(words[i: i + 2 + i % 3])}
                                            for i in range(6)])
    do_rollout(student, prompts, tmp / "r", n=2, max_new_tokens=10, temperature=T, top_p=TOP_P)
    do_score(teacher_model, tmp / "r", tmp / "t", top_k=K)
    return student, tmp / "t", read_rows(tmp / "t")


def padded(rows, name) -> torch.Tensor:
    width = max(len(r["completion_ids"]) for r in rows)
    out = torch.zeros((len(rows), width), dtype=torch.float64)
    for i, r in enumerate(rows):
        out[i, :len(r[name])] = torch.tensor(r[name], dtype=torch.float64)
    return out


@pytest.mark.parametrize("name", ["lightning-opd", "opd-seq", "rkl"])
def test_a_gradient_at_every_completion_position(world, name):
    student, _, rows = world
    behavior = np.concatenate([r["behavior_logprobs"] for r in rows])
    assert (behavior == 0).mean() > 0.5, "most nuclei hold a single token: the case that must still teach"
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    logits = torch.tensor(np.concatenate([completion_logits(model, r["prompt_ids"], r["completion_ids"])
                                          for r in rows]), dtype=torch.float32, requires_grad=True)
    targets = torch.tensor(np.concatenate([r["completion_ids"] for r in rows]))
    n = len(targets)
    column = lambda key: torch.tensor(np.concatenate([r[key] for r in rows]), dtype=torch.float32)  # noqa: E731
    top_ids = column("topk_ids").long().view(n, K)
    objective = O.OBJECTIVES[name]()
    mask = padded(rows, "completion_ids").ne(0).double()
    for i, r in enumerate(rows):
        mask[i, :len(r["completion_ids"])] = 1
    groups = torch.tensor([int(r["prompt_id"][1:]) for r in rows])
    prepared = objective.prepare(O.StepRows(lambda key: padded(rows, key), mask, groups, lambda x: x))
    inputs = O.Inputs(logprob_stats(logits, targets, T, at=top_ids), teacher_logprobs=column("teacher_logprobs"),
                      behavior_logprobs=column("behavior_logprobs"), policy_logprobs=column("policy_logprobs"),
                      topk_ids=top_ids, topk_logprobs=column("topk_logprobs").view(n, K),
                      teacher_log_tail=column("teacher_log_tail"),
                      prepared={key: v[mask.bool()].float() for key, v in prepared.items()})
    (grad,) = torch.autograd.grad(objective.loss(inputs).sum(), logits)
    per_position = grad.abs().sum(-1)
    assert (per_position > 0).all(), f"{int((per_position == 0).sum())} of {n} positions have no gradient"


def test_a_step_reports_the_samplers_truncation(world, tmp_path):
    student, store, rows = world
    do_train(student, store, tmp_path / "opd", objective="lightning-opd", steps=1, batch_size=12, lr=1e-4,
             allow_teacher_mismatch=True)
    first = metrics(tmp_path / "opd")[0]
    behavior = np.concatenate([r["behavior_logprobs"] for r in rows])
    policy = np.concatenate([r["policy_logprobs"] for r in rows])
    assert first["sampler_single_token"] == pytest.approx((behavior == 0).mean(), abs=1e-6)
    assert first["sampler_kept_mass"] == pytest.approx(np.exp(policy - behavior).mean(), rel=1e-5)
    assert first["grad_norm"] > 0 and first["loss"] != 0
    assert first["is_ratio_mean"] == pytest.approx(1.0, abs=1e-5)


def test_a_step_with_no_gradient_says_so(tiny_model, tmp_path, monkeypatch, capsys):
    """A teacher store scored by the student itself at the sampling temperature: every lightning-opd
    advantage is exactly 0, and the run says so on stderr instead of passing silently."""
    words = [f"w{i}" for i in range(40)]
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"p{i}", "prompt": " ".join(words[i: i + 3])}
                                                  for i in range(4)])
    do_rollout(tiny_model, prompts, tmp_path / "r", n=2, max_new_tokens=6, temperature=1.0)
    do_score(tiny_model, tmp_path / "r", tmp_path / "t", top_k=4)
    code, out, err = cli(monkeypatch, capsys, "train", "--student", str(tiny_model), "--data", str(tmp_path / "t"),
                         "--out", str(tmp_path / "o"), "--objective", "lightning-opd", "--steps", "2",
                         "--batch-size", "8", "--allow-teacher-mismatch")
    assert code == 0
    assert [m["grad_norm"] for m in metrics(tmp_path / "o")] == [0.0, 0.0]
    assert "step 1: the gradient is zero" in err and "2 of 2 steps had a zero gradient" in err
    assert json.loads(out)["zero_gradient_steps"] == 2
