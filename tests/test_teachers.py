"""Many teachers, one student (data/routes.py, stages/train_data.py): score-teacher --where routes a
mixed rollout store's rows to teachers; train --data A --data B reads the routed stores as one, with
per-teacher metrics checked against a float64 reference, teacher weights, the coverage and overlap
errors, and the consistency gate against an SFT mixture."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from lightopd.data.store import open_store
from lightopd.provenance import model_fingerprint, read_provenance, write_provenance
from lightopd.tiny import make_model
from tests.helpers import cli, do_rollout, do_score, do_train, metrics, read_rows, write_jsonl
from tests.reference import completion_logits, log_softmax64

DOMAINS = ("math", "code", "bio")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model, teacher_model):
    """A student's rollouts over prompts of three domains, and two teachers with its vocabulary."""
    tmp = tmp_path_factory.mktemp("teachers")
    second = make_model(tmp / "second", seed=11, hidden=48, layers=3, logit_scale=20.0)
    records = [{"id": f"p{i}", "prompt": f"w{i} w{i + 1} w{i % 3}", "domain": DOMAINS[i % 3], "level": i % 2}
               for i in range(9)]
    do_rollout(tiny_model, write_jsonl(tmp / "p.jsonl", records), tmp / "rollouts", n=2, max_new_tokens=8,
               prompts_per_shard=4)
    return {"tmp": tmp, "rollouts": tmp / "rollouts", "first": teacher_model, "second": second}


def routed(world, teacher, name, *where, out=None):
    out = world["tmp"] / (out or name)
    if not out.exists():
        do_score(world[teacher], world["rollouts"], out, top_k=4, teacher_name=name, where=where)
    return out


def student_of(tmp_path, tiny_model, *teachers):
    """The student with provenance naming these teachers as its SFT teachers (a mixture when several)."""
    student = tmp_path / "student"
    shutil.copytree(tiny_model, student)
    records = [{"path": str(t), "fingerprint": model_fingerprint(t)} for t in teachers]
    write_provenance(student, {"sft_teacher": records[0], **({"sft_teachers": records} if len(records) > 1 else {})})
    return student


def test_where_scores_only_the_routed_rows(world):
    store = routed(world, "first", "mathy", "domain=math,bio", "level=0")
    rows = read_rows(store)
    want = {(r["prompt_id"], r["sample_index"]) for r in read_rows(world["rollouts"])
            if json.loads(r["metadata"])["domain"] in ("math", "bio") and json.loads(r["metadata"])["level"] == 0}
    assert {(r["prompt_id"], r["sample_index"]) for r in rows} == want and 0 < len(want) < 18
    manifest = open_store(store)
    assert manifest["teacher"]["name"] == "mathy" and manifest["rows"] == len(want)
    assert manifest["scoring"]["route"] == {"where": {"domain": ["math", "bio"], "level": ["0"]}, "rows": len(want),
                                            "rollout_rows": 18}


def test_a_route_that_takes_nothing_is_exit_2(world, monkeypatch, capsys):
    base = ["score-teacher", "--teacher", str(world["first"]), "--data", str(world["rollouts"])]
    code, _, err = cli(monkeypatch, capsys, *base, "--out", str(world["tmp"] / "none"), "--where", "domain=chem")
    assert code == 2 and "takes none of the 18 rows" in err and "domain holds" in err and "math" in err
    code, _, err = cli(monkeypatch, capsys, *base, "--out", str(world["tmp"] / "none"), "--where", "domain")
    assert code == 2 and "expected FIELD=VALUE" in err


def test_two_routed_teachers_train_with_per_teacher_metrics(world, tiny_model, tmp_path):
    """lightning-opd over two routed stores covering every row: the step's loss and each teacher's
    loss and k1 from a float64 forward; --teacher-weight scales one teacher's rows."""
    a = routed(world, "first", "ta", "domain=math,bio")
    b = routed(world, "second", "tb", "domain=code")
    student = student_of(tmp_path, tiny_model, world["first"], world["second"])
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float64).eval()
    per = {}
    for name, store in (("ta", a), ("tb", b)):
        values, k1 = [], []
        for row in read_rows(store):
            lp = log_softmax64(completion_logits(model, row["prompt_ids"], row["completion_ids"]))
            lq = lp[np.arange(len(row["completion_ids"])), row["completion_ids"]]
            lt = np.array(row["teacher_logprobs"])
            values += list(-(lt - lq) * lq)
            k1 += list(lq - lt)
        per[name] = (np.array(values), np.array(k1))
    rows = len(read_rows(a)) + len(read_rows(b))
    assert rows == 18
    n = sum(len(v) for v, _ in per.values())
    for weights, w in (((), 1.0), (("tb=2.5",), 2.5)):
        out = tmp_path / f"run{w}"
        result, _ = do_train(student, (str(a), str(b)), out, objective="lightning-opd", steps=1, batch_size=rows,
                             teacher_weight=weights, micro_batch_tokens=40, loss_chunk_tokens=7)
        assert result["teachers"] == {"ta": {"rows": len(read_rows(a)), "tokens": len(per["ta"][0])},
                                      "tb": {"rows": len(read_rows(b)), "tokens": len(per["tb"][0])}}
        first = metrics(out)[0]
        assert first["loss"] == pytest.approx((per["ta"][0].sum() + w * per["tb"][0].sum()) / n, rel=1e-4)
        for name, (values, k1) in per.items():
            assert first[f"teacher_token_frac/{name}"] == pytest.approx(len(values) / n)
            assert first[f"teacher_loss/{name}"] == pytest.approx(values.mean(), rel=1e-4)
            assert first[f"teacher_k1/{name}"] == pytest.approx(k1.mean(), rel=1e-4)
    provenance = read_provenance(tmp_path / "run1.0")
    assert [t["name"] for t in provenance["data"]["teacher"]] == ["ta", "tb"]
    assert {t["fingerprint"] for t in provenance["sft_teachers"]} == {model_fingerprint(world["first"]),
                                                                      model_fingerprint(world["second"])}


def test_coverage_overlap_and_the_gate_are_checked(world, tiny_model, tmp_path, monkeypatch, capsys):
    a = routed(world, "first", "ta", "domain=math,bio")
    b = routed(world, "second", "tb", "domain=code")
    math_only = routed(world, "first", "tm", "domain=math")
    both = routed(world, "second", "tall", out="tall")
    mixture = student_of(tmp_path / "m", tiny_model, world["first"], world["second"])
    only_first = student_of(tmp_path / "f", tiny_model, world["first"])

    def train(student, *stores, extra=()):
        data = [x for s in stores for x in ("--data", str(s))]
        return cli(monkeypatch, capsys, "train", "--student", str(student), *data, "--steps", "1", "--batch-size",
                   "4", "--out", str(tmp_path / f"o{len(list(tmp_path.iterdir()))}"), *extra)

    code, _, err = train(mixture, math_only, b)
    assert code == 2 and "6 of the 18 rows of their rollouts are scored by none of these teachers" in err
    code, _, err = train(mixture, math_only, b, extra=("--allow-unrouted",))
    assert code == 0 and "--allow-unrouted: training on the routed rows alone" in err
    code, _, err = train(mixture, a, both)
    assert code == 2 and "both hold prompt" in err
    code, _, err = train(only_first, a, b)
    assert code == 2 and f"scored --data {b}" in err and str(world["second"]) in err
    code, _, err = train(mixture, a, b, extra=("--teacher-weight", "nobody=2"))
    assert code == 2 and "no --data store was scored by a teacher named 'nobody'" in err


def test_sft_on_several_teachers_records_them_all(world, tiny_model, tmp_path):
    """SFT on two teachers' samples records both; the student then passes the gate for either."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": f"w{i} w{i + 2}"} for i in range(4)])
    for teacher in ("first", "second"):
        do_rollout(world[teacher], prompts, tmp_path / f"sft-{teacher}", n=2, max_new_tokens=6)
    do_train(tiny_model, (str(tmp_path / "sft-first"), str(tmp_path / "sft-second")), tmp_path / "sft",
             objective="sft", steps=2, batch_size=4)
    record = read_provenance(tmp_path / "sft")
    assert [t["fingerprint"] for t in record["sft_teachers"]] == [model_fingerprint(world["first"]),
                                                                  model_fingerprint(world["second"])]
    assert len(record["data"]["stores"]) == 2


def test_g_opd_over_the_mixture_with_a_scored_reference(world, tiny_model, tmp_path, monkeypatch, capsys):
    """score-teacher --reference stores the base's sampled-token log-probs (float64 reference); g-opd with
    objective.reference=scored over two routed teachers: A = λ(ℓT − ℓref) − (lq − ℓref), the step's
    loss by hand."""
    a = routed(world, "first", "ra", "domain=math,bio", out="ref-a")
    stores = [a]
    for teacher, name, where in (("first", "ga", "domain=math,bio"), ("second", "gb", "domain=code")):
        out = tmp_path / name
        do_score(world[teacher], world["rollouts"], out, top_k=4, teacher_name=name, where=(where,),
                 reference=str(tiny_model))
        stores.append(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64).eval()
    student = student_of(tmp_path, tiny_model, world["first"], world["second"])  # the base itself: lq = ℓref
    values = []
    for store in stores[1:]:
        assert open_store(store)["scoring"]["reference"]["fingerprint"] == model_fingerprint(tiny_model)
        for row in read_rows(store):
            lp = log_softmax64(completion_logits(base, row["prompt_ids"], row["completion_ids"]))
            ref = lp[np.arange(len(row["completion_ids"])), row["completion_ids"]]
            np.testing.assert_allclose(row["reference_logprobs"], ref, atol=1e-5, rtol=0)
            values += list(-1.5 * (np.array(row["teacher_logprobs"]) - ref) * ref)
    out = tmp_path / "g"
    do_train(student, tuple(stores[1:]), out, objective="g-opd", steps=1, batch_size=18,
             sets=[("objective.lambda", 1.5), ("objective.reference", "scored")])
    assert metrics(out)[0]["loss"] == pytest.approx(np.mean(values), rel=1e-4)
    code, _, err = cli(monkeypatch, capsys, "train", "--student", str(student), "--data", str(a), "--objective",
                       "g-opd", "--set", "objective.reference=scored", "--steps", "1", "--batch-size", "4", "--out",
                       str(tmp_path / "x"))
    assert code == 2 and "scored without a reference model" in err
