"""`lightopd inspect --stats` (data/store_stats.py): every figure against a hand computation over
the rows (numpy's linear quantiles, a Counter, the Parquet metadata), on a teacher store with
rewards; `--format json` writes the JSON line alone."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest

from lightopd.data.store import open_store
from tests.helpers import cli, do_rollout, do_score, read_rows, write_jsonl


@pytest.fixture(scope="module")
def scored(tiny_model, teacher_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stats")
    records = [{"id": f"p{i}", "prompt": f"w{i} w{i + 3}", "answer": f"w{(i * 7) % 5}"} for i in range(12)]
    do_rollout(tiny_model, write_jsonl(tmp / "p.jsonl", records), tmp / "r", n=4, max_new_tokens=24,
               temperature=0.8, prompts_per_shard=5)
    do_score(teacher_model, tmp / "r", tmp / "t", top_k=4)
    return tmp / "t"


def q(values) -> dict:
    return {f"p{p}": pytest.approx(float(np.quantile(values, p / 100)), rel=1e-5, abs=1e-6) for p in (10, 50, 90)}


def test_stats_match_a_hand_count(scored, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "inspect", str(scored), "--stats")
    assert code == 0, err
    stats = json.loads(out.strip().splitlines()[-1])["stats"]
    rows = read_rows(scored)
    manifest = open_store(scored)
    sizes = Counter()
    for shard in manifest["shards"]:
        md = pq.ParquetFile(scored / shard["name"]).metadata
        for rg in range(md.num_row_groups):
            for c in range(md.num_columns):
                sizes[md.row_group(rg).column(c).path_in_schema.split(".")[0]] += \
                    md.row_group(rg).column(c).total_compressed_size
    assert stats["bytes_per_token"] == {k: pytest.approx(v / manifest["tokens"], abs=0.006) for k, v in sizes.items()}
    assert stats["lengths"]["completion"] == q([len(r["completion_ids"]) for r in rows])
    assert stats["lengths"]["prompt"] == q([len(r["prompt_ids"]) for r in rows])
    assert stats["finish_reasons"] == dict(Counter(r["finish_reason"] for r in rows))
    by_prompt = defaultdict(list)
    for r in rows:
        by_prompt[r["prompt_id"]].append(r["reward"])
    rates = [np.mean([x >= 1 for x in v]) for v in by_prompt.values()]
    assert stats["rewards"]["prompts"] == 12 and stats["rewards"]["pass_rate_per_prompt"] == q(rates)
    assert stats["rewards"]["prompts_all_pass"] == sum(r == 1 for r in rates)
    assert stats["rewards"]["prompts_none_pass"] == sum(r == 0 for r in rates)
    assert stats["rewards"]["mean"] == pytest.approx(np.mean([r["reward"] for r in rows]), abs=1e-4)
    buckets = {"0-15": (0, 16), "16-63": (16, 64)}
    assert [b["positions"] for b in stats["by_position"]] == list(buckets)
    for bucket in stats["by_position"]:
        low, high = buckets[bucket["positions"]]

        def at(column, rows=rows, low=low, high=high):
            return np.concatenate([np.array(r[column][low:high], dtype=np.float64) for r in rows])

        assert bucket["tokens"] == len(at("teacher_entropy"))
        assert bucket["teacher_entropy"] == q(at("teacher_entropy"))
        assert bucket["teacher_tail_mass"] == q(np.exp(at("teacher_log_tail")))
        assert bucket["teacher_logprob"] == q(at("teacher_logprobs"))
        assert bucket["student_minus_teacher"] == q(at("behavior_logprobs") - at("teacher_logprobs"))


def test_format_json_writes_the_json_line_alone(scored, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "inspect", str(scored), "--stats", "--format", "json")
    assert code == 0 and err == "" and len(out.strip().splitlines()) == 1
    assert "by_position" in json.loads(out)["stats"]


def test_a_large_store_reads_every_sth_row_for_the_per_token_figures(scored, monkeypatch):
    """Memory bounded by design: over TOKENS tokens, the per-token quantiles read every s-th row."""
    from lightopd.data import store_stats

    manifest = open_store(scored)
    monkeypatch.setattr(store_stats, "TOKENS", manifest["tokens"] // 3)
    stats = store_stats.store_stats(scored, manifest)
    stride = -(-manifest["tokens"] // (manifest["tokens"] // 3))
    assert stats["by_position_rows"] == {"every": stride, "of": manifest["rows"]} and stride > 2
    rows = read_rows(scored)[::stride]
    first = stats["by_position"][0]
    values = np.concatenate([np.array(r["teacher_entropy"][:16], dtype=np.float64) for r in rows])
    assert first["tokens"] == len(values) and first["teacher_entropy"] == q(values)
