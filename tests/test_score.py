"""`lightopd score-teacher` against an independent float64 full-vocabulary forward of the teacher."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from lightopd.config import ScoreConfig
from lightopd.data.reader import verify
from lightopd.data.store import TEACHER_FORMAT, open_store, teacher_schema
from lightopd.engine.forward import PositionLogits
from lightopd.tiny import make_model
from tests.helpers import do_score, read_rows
from tests.reference import completion_logits, log_softmax64


@pytest.fixture(scope="module")
def gpt2_teacher(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("models") / "gpt2-teacher", arch="gpt2", seed=9, logit_scale=20.0)


@pytest.mark.parametrize("k,temperature,topk_dtype,arch,split_head,chunk", [
    (5, 1.0, "float16", "llama", True, 1 << 25),
    (50, 1.0, "float32", "llama", True, 100),  # k = V, and chunks of 2 positions
    (8, 2.0, "float16", "llama", False, 1 << 25),  # the model's own full forward
    (8, 1.0, "float32", "gpt2", True, 1 << 25),
])
def test_matches_float64_reference(teacher_model, gpt2_teacher, rollout_store, tmp_path, monkeypatch,
                                   k, temperature, topk_dtype, arch, split_head, chunk):
    teacher = gpt2_teacher if arch == "gpt2" else teacher_model
    if not split_head:
        monkeypatch.setattr(PositionLogits, "_split_head_matches", lambda self: False)
    out = tmp_path / "teacher"
    result = do_score(teacher, rollout_store, out, top_k=k, temperature=temperature, topk_dtype=topk_dtype,
                      chunk_elements=chunk, micro_batch_tokens=40)
    assert result["complete"] and verify(out) == []
    assert pq.ParquetFile(out / "part-00000.parquet").schema_arrow == teacher_schema(topk_dtype)
    reference = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float64).eval()
    outside_topk = 0
    for row in read_rows(out):
        n = len(row["completion_ids"])
        ref = log_softmax64(completion_logits(reference, row["prompt_ids"], row["completion_ids"]) / temperature)
        want_sampled = ref[np.arange(n), row["completion_ids"]]
        np.testing.assert_allclose(row["teacher_logprobs"], want_sampled, atol=1e-5, rtol=0)
        ids = np.array(row["topk_ids"]).reshape(n, k)
        lps = np.array(row["topk_logprobs"], dtype=np.float64).reshape(n, k)
        want_ids = np.argsort(-ref, axis=-1, kind="stable")[:, :k]
        # the teacher's top-k, its argmax first (an id-ordered store restores the descending order, and
        # orders log-probs that tie in float16 by id)
        assert (np.sort(ids, axis=-1) == np.sort(want_ids, axis=-1)).all() and (ids[:, 0] == want_ids[:, 0]).all()
        want_lps = np.take_along_axis(ref, ids, axis=-1)
        bits = ScoreConfig.of(teacher="", data="", out="").encoding.topk_bits  # float16 rounded to this many bits
        tol = np.abs(want_lps) * 2.0**-bits + 1e-6 if topk_dtype == "float16" else 1e-5
        assert (np.abs(lps - want_lps) <= tol).all()
        assert (np.diff(lps, axis=-1) <= 0).all(), "top-k in descending order"
        entropy = -(np.exp(ref) * ref).sum(-1)
        np.testing.assert_allclose(row["teacher_entropy"], entropy, atol=1e-4, rtol=2.0**-11)  # 11 bits kept
        outside = np.ones(ref.shape, dtype=bool)
        np.put_along_axis(outside, want_ids, False, -1)
        with np.errstate(divide="ignore"):
            tail = np.log(np.where(outside, np.exp(ref), 0.0).sum(-1))  # -inf when k = V
        np.testing.assert_allclose(row["teacher_log_tail"], tail, rtol=1e-4)
        outside_topk += sum(y not in ids[t] for t, y in enumerate(row["completion_ids"]))
    if k < 50:
        assert outside_topk > 0, "the test should cover sampled tokens outside the top-k"


def test_teacher_store_carries_rollout_columns_and_provenance(teacher_model, rollout_store, tmp_path):
    out = tmp_path / "teacher"
    do_score(teacher_model, rollout_store, out, top_k=4)
    manifest, rollouts = open_store(out), open_store(rollout_store)
    assert manifest["format"] == TEACHER_FORMAT and manifest["num_shards"] == rollouts["num_shards"] == 4
    assert manifest["rows"] == rollouts["rows"] and manifest["tokens"] == rollouts["tokens"]
    assert manifest["scoring"] == {"top_k": 4, "temperature": 1.0, "topk_logprobs_dtype": "float16",
                                   "topk_order": "id", "vocab_size": 50,
                                   "topk_bits": ScoreConfig.of(teacher="", data="", out="").encoding.topk_bits,
                                   "entropy_bits": 11, "support_samples": 0, "support_seed": 0,
                                   "engine": {"name": "hf"}, "unavailable": [], "context": None, "route": None,
                                   "reference": None}
    assert manifest["tokenizer"]["fingerprint"] == rollouts["tokenizer"]["fingerprint"]
    assert manifest["rollouts"]["model"]["fingerprint"] == rollouts["model"]["fingerprint"]
    assert manifest["rollouts"]["fingerprint"].startswith("sha256:")
    assert manifest["teacher"]["fingerprint"] != rollouts["model"]["fingerprint"]
    got, want = read_rows(out), read_rows(rollout_store)
    for g, w in zip(got, want, strict=True):
        assert {c: g[c] for c in w} == w
        assert len(g["topk_ids"]) == 4 * len(g["completion_ids"]) == 4 * len(g["teacher_entropy"])
