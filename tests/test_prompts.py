"""Prompt files: JSONL and Parquet read alike; ids default to the record index."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lightopd.data.prompts import read_prompts
from lightopd.errors import InputError
from tests.helpers import last_json, run_cli, write_jsonl


def test_jsonl_and_parquet_read_alike(tmp_path):
    records = [{"prompt": "w1 w2", "answer": "7"}, {"id": "x", "prompt": "w3"}, {"id": 5, "prompt": "w4", "answer": 12}]
    jsonl = read_prompts(write_jsonl(tmp_path / "p.jsonl", records))
    pq.write_table(pa.table({  # a Parquet column has one type; missing values are nulls
        "id": [None, "x", "5"], "prompt": ["w1 w2", "w3", "w4"], "answer": ["7", None, "12"],
    }), tmp_path / "p.parquet")
    parquet = read_prompts(tmp_path / "p.parquet")
    assert [(r.id, r.prompt, r.answer) for r in jsonl] == [("0", "w1 w2", "7"), ("x", "w3", None), ("5", "w4", "12")]
    assert [(r.id, r.prompt, r.answer) for r in parquet] == [(r.id, r.prompt, r.answer) for r in jsonl]
    assert parquet[1].where.endswith("p.parquet row 1")


def test_limit_reads_only_the_first_records(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "w1"}\n{"prompt": "w2"}\nnot json\n')
    assert [r.prompt for r in read_prompts(path, limit=2)] == ["w1", "w2"]
    with pytest.raises(InputError, match="line 3"):
        read_prompts(path)


def test_unknown_extension(tmp_path):
    (tmp_path / "p.csv").write_text("prompt\nw1\n")
    with pytest.raises(InputError, match="unknown prompt file type '.csv'"):
        read_prompts(tmp_path / "p.csv")


def test_rollout_records_the_models_sft_teacher(tiny_model, prompts_file, tmp_path):
    import shutil

    from lightopd.provenance import write_provenance

    student = tmp_path / "student"
    shutil.copytree(tiny_model, student)
    write_provenance(student, {"sft_teacher": {"path": "/teachers/t", "fingerprint": "sha256:abc"}})
    result = last_json(run_cli("rollout", "--model", str(student), "--prompts", str(prompts_file),
                               "--out", str(tmp_path / "r"), "--max-new-tokens", "3", "--limit", "2"))
    assert result["rows"] == 2
    info = last_json(run_cli("inspect", str(tmp_path / "r")))
    assert info["model"]["sft_teacher"] == {"path": "/teachers/t", "fingerprint": "sha256:abc"}
    assert info["prompts"]["count"] == 2 and info["prompts"]["limit"] == 2


def test_help_documents_every_option():
    out = run_cli("rollout", "--help").stdout
    for option in ("--model", "--prompts", "--out", "--n", "--max-new-tokens", "--temperature", "--top-p",
                   "--seed", "--limit", "--generation-batch-size", "--prompts-per-shard", "--device", "--dtype",
                   "--trust-remote-code"):
        assert option in out
    assert "inspect" in run_cli("--help").stdout
