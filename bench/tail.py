"""How exact is the stored teacher signal on a confident teacher? Prints JSON.

A 32k-vocabulary teacher has its output layer scaled until its mass outside the top-32 is about
1e-6 or less, as a confident reasoning teacher's is. The student's rollouts are scored by the
real score-teacher, once with float16 and once with float32 top-k log-probs. Against float64
forwards of both models it reports:
- the teacher's log tail mass: stored (score-teacher's exact float32 log-sum-exp) and, as it was
  before, rebuilt as log(1 − Σ exp(top-k)) from the float16 values: median and worst error, nats;
- every analytic objective on the tail-bucket support at k = 32 < V, computed by the objectives
  from the stored columns and the student's float32 logits, against its float64 value from both
  models' full logits: median and worst error relative to max(|value|, 1e-3) (a divergence below
  1e-3 nats is held to 1e-5 absolute), for each storage dtype; and rkl with the rebuilt tail.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, make_bench_model  # noqa: E402

from lightopd import objectives as O  # noqa: E402
from lightopd.config import RolloutConfig, ScoreConfig  # noqa: E402
from lightopd.data.reader import iter_batches  # noqa: E402
from lightopd.objectives.stats import logprob_stats  # noqa: E402
from lightopd.objectives.support import Dist, kl  # noqa: E402
from lightopd.stages import rollout, score  # noqa: E402

K = 32
NAMES = {"rkl": {}, "fkl": {}, "jsd": {"beta": 0.3}, "skew-fkl": {}, "skew-rkl": {}, "taid": {}}


def log_softmax64(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def logits64(model, prompt: list[int], completion: list[int]) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt + completion])).logits[0].double().numpy()
    return out[len(prompt) - 1: len(prompt) - 1 + len(completion)]


def reference(name: str, lq: np.ndarray, lp: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The tail-bucket divergence in float64 from full log-probs."""
    rest = np.ones_like(lp, dtype=bool)
    np.put_along_axis(rest, ids, False, -1)

    def bucket(x):
        tail = np.log(np.maximum(np.where(rest, np.exp(x), 0.0).sum(-1, keepdims=True), 1e-8))
        return np.concatenate([np.take_along_axis(x, ids, -1), tail], -1)

    q, p = bucket(lq), bucket(lp)
    div = lambda a, b: (np.exp(a) * (a - b)).sum(-1)  # noqa: E731
    mix = lambda a, b, w: np.log(w * np.exp(a) + (1 - w) * np.exp(b))  # noqa: E731
    if name == "rkl":
        return div(q, p)
    if name == "fkl":
        return div(p, q)
    if name == "jsd":
        return 0.3 * div(p, mix(p, q, 0.3)) + 0.7 * div(q, mix(p, q, 0.3))
    if name == "skew-fkl":
        return div(p, mix(p, q, 0.1))
    if name == "skew-rkl":
        return div(q, mix(p, q, 0.9))
    r = 0.6 * q + 0.4 * p  # taid at t = 0.4 (its t_start): target (1 − t)·log q̂ + t·log p̂, renormalised
    r = r - np.log(np.exp(r).sum(-1, keepdims=True))
    return div(r, q)


def confident_scale(model, target: float = 1e-6) -> float:
    """The factor (1e-3 to 1000) on the output layer that puts the median mass outside the top-K at `target`."""
    with torch.no_grad():
        logits = model(input_ids=torch.randint(4, 31990, (4, 48), generator=torch.Generator().manual_seed(0))
                       ).logits.reshape(-1, model.config.vocab_size).double()
    low, high = 1e-3, 1000.0
    for _ in range(50):
        mid = (low * high) ** 0.5
        lp = torch.log_softmax(logits * mid, -1)
        tail = lp.topk(lp.shape[-1] - K, largest=False).values.logsumexp(-1).exp().median()
        low, high = (mid, high) if tail > target else (low, mid)
    return high


def scaled_teacher(source: Path, out: Path, tail: float) -> Path:
    """A copy of the teacher at `source` with its output layer scaled (confident_scale) until the median
    mass outside its top-K is `tail`, with its tokenizer."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        model.lm_head.weight.mul_(confident_scale(model, tail))
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "lightopd.json"):
        if (source / name).is_file():
            (out / name).write_bytes((source / name).read_bytes())
    return out


def bench_world(tmp: Path, prompts: int, tails: dict[str, float]) -> tuple[Path, dict[str, Path], Path]:
    """The bench world of the store benchmarks: a 32k-vocabulary student's rollouts (`prompts` prompts
    of 16 to 128 words × 2 samples of 128 tokens), and the bench teacher beside its copies scaled to
    each of `tails` (name: median mass outside the top-K). Returns (student, teachers, rollouts)."""
    student = make_bench_model(tmp / "student", seed=0)
    teachers = {"bench": make_bench_model(tmp / "teacher", seed=1)}
    for label, tail in tails.items():
        teachers[label] = scaled_teacher(teachers["bench"], tmp / label, tail)
    rng = random.Random(0)
    source = tmp / "prompts.jsonl"
    source.write_text("".join(
        json.dumps({"prompt": " ".join(f"w{rng.randrange(31990)}" for _ in range(rng.randint(16, 128)))}) + "\n"
        for _ in range(prompts)))
    rollout.run(RolloutConfig.of(model=str(student), prompts=str(source), out=str(tmp / "r"), n=2,
                                 max_new_tokens=128, prompts_per_shard=16, device="cpu"))
    return student, teachers, tmp / "r"


def summary(values: list[float]) -> dict:
    return {"median": float(np.median(values)), "worst": float(np.max(values))}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        student = make_bench_model(tmp / "student", seed=0)
        teacher = make_bench_model(tmp / "teacher", seed=1)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(teacher)
        with torch.no_grad():
            model.lm_head.weight.mul_(confident_scale(model))
        model.save_pretrained(teacher)
        rng = random.Random(0)
        prompts = tmp / "p.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": " ".join(f"w{rng.randrange(31990)}"
                                                                  for _ in range(rng.randint(8, 32)))}) + "\n"
                                   for _ in range(12)))
        rollout.run(RolloutConfig.of(model=str(student), prompts=str(prompts), out=str(tmp / "r"), n=2,
                                     max_new_tokens=24, device="cpu"))
        stores = {}
        for dtype in ("float16", "float32"):
            score.run(ScoreConfig.of(teacher=str(teacher), data=str(tmp / "r"), out=str(tmp / dtype), top_k=K,
                                     topk_dtype=dtype, device="cpu"))
            stores[dtype] = [r for b in iter_batches(tmp / dtype) for r in b.to_pylist()]
        s64 = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float64).eval()
        t64 = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float64).eval()

        tails, tail_err = [], {"stored": [], "rebuilt_from_float16": []}
        rel = {f"{n}_{d}": [] for n in NAMES for d in stores} | {"rkl_float16_rebuilt_tail": []}
        for i, row in enumerate(stores["float32"]):
            s = logits64(s64, row["prompt_ids"], row["completion_ids"])
            lq, lp = log_softmax64(s), log_softmax64(logits64(t64, row["prompt_ids"], row["completion_ids"]))
            n = len(row["completion_ids"])
            ids = np.array(row["topk_ids"]).reshape(n, K)
            rest = np.ones_like(lp, dtype=bool)
            np.put_along_axis(rest, ids, False, -1)
            true_tail = np.log(np.where(rest, np.exp(lp), 0.0).sum(-1))
            tails += list(np.exp(true_tail))
            half = np.array(stores["float16"][i]["topk_logprobs"], dtype=np.float64).reshape(n, K)
            rebuilt = np.log(np.maximum(1 - np.exp(half).sum(-1), 1e-8))
            tail_err["stored"] += list(np.abs(np.array(row["teacher_log_tail"]) - true_tail))
            tail_err["rebuilt_from_float16"] += list(np.abs(rebuilt - true_tail))
            targets = torch.tensor(row["completion_ids"])
            for dtype, rows in stores.items():
                stored = rows[i]
                view = logprob_stats(torch.from_numpy(s).float(), targets, at=torch.from_numpy(ids))
                inputs = O.Inputs(view, topk_ids=torch.from_numpy(ids),
                                  topk_logprobs=torch.tensor(stored["topk_logprobs"]).view(n, K),
                                  teacher_log_tail=torch.tensor(stored["teacher_log_tail"]))
                for name, params in NAMES.items():
                    objective = O.OBJECTIVES[name](O.OBJECTIVES[name].Params(**params))
                    got = objective.loss(inputs).detach().double().numpy()
                    want = reference(name, lq, lp, ids)
                    rel[f"{name}_{dtype}"] += list(np.abs(got - want) / np.maximum(np.abs(want), 1e-3))
                if dtype == "float16":  # the old way: the teacher's bucket rebuilt from the float16 top-k
                    old_p = Dist(inputs.topk_logprobs.float(), torch.from_numpy(rebuilt).float())
                    old_q = Dist(view.at, view.at_rest().clamp_min(np.log(1e-8)))
                    got = kl(old_q, old_p).detach().double().numpy()
                    want = reference("rkl", lq, lp, ids)
                    rel["rkl_float16_rebuilt_tail"] += list(np.abs(got - want) / np.maximum(np.abs(want), 1e-3))
    print(json.dumps({
        "benchmark": "tail",
        "machine": machine(),
        "teacher": {"vocab": 32000, "top_k": K, "tail_mass": summary(tails) | {"min": float(np.min(tails))}},
        "positions": len(tails),
        "log_tail_error_nats": {k: summary(v) for k, v in tail_err.items()},
        "relative_error_vs_float64": {k: summary(v) for k, v in rel.items()},
    }))


if __name__ == "__main__":
    main()
