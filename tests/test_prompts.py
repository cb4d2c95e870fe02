"""Prompt sources and field mapping: JSONL, Parquet and CSV read alike; dataset fields recognised or
named by flags; other fields kept as metadata; bad mappings name the source, record and field."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from lightopd.data.fields import Mapping
from lightopd.data.prompts import read_prompts
from lightopd.data.sources import Source
from lightopd.errors import InputError
from tests.helpers import last_json, run_cli, write_jsonl


def test_jsonl_parquet_and_csv_read_alike(tmp_path):
    records = [{"prompt": "w1 w2", "answer": "7"}, {"id": "x", "prompt": "w3"}, {"id": 5, "prompt": "w4", "answer": 12}]
    jsonl = read_prompts(write_jsonl(tmp_path / "p.jsonl", records))
    table = pa.table({  # a column has one type; missing values are nulls
        "id": [None, "x", "5"], "prompt": ["w1 w2", "w3", "w4"], "answer": ["7", None, "12"],
    })
    pq.write_table(table, tmp_path / "p.parquet")
    pacsv.write_csv(table, tmp_path / "p.csv")
    expected = [("0", "w1 w2", "7", {}), ("x", "w3", None, {}), ("5", "w4", "12", {})]
    for path in ("p.jsonl", "p.parquet", "p.csv"):
        got = read_prompts(tmp_path / path) if path != "p.jsonl" else jsonl
        assert [(r.id, r.prompt, r.answer, r.metadata) for r in got] == expected, path
    assert read_prompts(tmp_path / "p.parquet")[1].where.endswith("p.parquet row 1")


def test_parquet_is_read_a_batch_at_a_time(tmp_path, monkeypatch):
    """A large Parquet file is never loaded whole: --limit stops reading after the first batch."""
    from lightopd.data import sources

    pq.write_table(pa.table({"prompt": [f"w{i % 30}" for i in range(10_000)]}), tmp_path / "big.parquet",
                   row_group_size=1000)
    monkeypatch.setattr(sources, "BATCH", 100)
    batches = []
    real = pq.ParquetFile.iter_batches

    def counting(self, *args, **kwargs):
        for batch in real(self, *args, **kwargs):
            batches.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    assert len(read_prompts(tmp_path / "big.parquet", limit=150)) == 150
    assert batches == [100, 100]


def test_limit_reads_only_the_first_records(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "w1"}\n{"prompt": "w2"}\nnot json\n')
    assert [r.prompt for r in read_prompts(path, limit=2)] == ["w1", "w2"]
    with pytest.raises(InputError, match="line 3"):
        read_prompts(path)


def test_unknown_extension(tmp_path):
    (tmp_path / "p.txt").write_text("w1\n")
    with pytest.raises(InputError, match="unknown prompt file type '.txt'"):
        read_prompts(tmp_path / "p.txt")


def test_gsm8k_and_math_records_are_recognised_and_the_rest_kept_as_metadata(tmp_path, capsys):
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [
        {"question": "w1 w2 ?", "answer": "w3 so 3 + 4 = 7\n#### 7", "source": "train", "difficulty": 2}])
    [record] = read_prompts(gsm)
    assert (record.id, record.prompt, record.answer) == ("0", "w1 w2 ?", "w3 so 3 + 4 = 7\n#### 7")
    assert record.metadata == {"source": "train", "difficulty": 2}
    err = capsys.readouterr().err
    assert "prompt <- 'question'; answer <- 'answer'; id <- record index; metadata <- difficulty, source" in err

    math = write_jsonl(tmp_path / "math.jsonl", [  # MATH-500's fields: answer beats solution, unique_id is the id
        {"problem": "p", "solution": "so \\boxed{5}", "answer": "5", "subject": "Algebra", "unique_id": "a/1.json"},
        {"problem": "q", "solution": "so \\boxed{6}", "level": 3, "unique_id": "a/2.json"}])
    first, second = read_prompts(math)
    assert (first.id, first.answer, first.metadata) == ("a/1.json", "5", {"solution": "so \\boxed{5}",
                                                                         "subject": "Algebra"})
    assert (second.answer, second.metadata) == ("so \\boxed{6}", {"level": 3})
    assert "answer <- 'answer' (1), 'solution' (1)" in capsys.readouterr().err


def test_fields_named_by_flags(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"key": 7, "text": "w1", "gold": 3.5, "prompt": "kept"}])
    [record] = read_prompts(path, Mapping(prompt="text", answer="gold", id="key"))
    assert (record.id, record.prompt, record.answer, record.metadata) == ("7", "w1", "3.5", {"prompt": "kept"})


def test_sharegpt_conversations_and_chat_columns(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"conversations": [
        {"from": "system", "value": "be brief"}, {"from": "human", "value": "w1 ?"}, {"from": "gpt", "value": "w2"}]}])
    [record] = read_prompts(path)
    assert record.prompt is None
    assert record.messages == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "w1 ?"})
    # a messages column of a CSV file holds JSON text
    csv = tmp_path / "p.csv"
    pacsv.write_csv(pa.table({"messages": [json.dumps([{"role": "user", "content": "w5"}])], "answer": ["1"]}), csv)
    assert read_prompts(csv)[0].messages == ({"role": "user", "content": "w5"},)


@pytest.mark.parametrize("records,mapping,message", [
    ([{"text": "w1"}], Mapping(prompt="question"), r"p.jsonl line 1: no field 'question' \(--prompt-field\); the "
                                                   r"record's fields are 'text'"),
    ([{"prompt": "w1"}, {"prompt": "w2", "gold": 1}], Mapping(answer="gold"), r"line 1: no field 'gold' "
                                                                             r"\(--answer-field\)"),
    ([{"question": 3}], Mapping(), r"line 1: field 'question' \(the prompt\) must be a string, got int"),
    ([{"prompt": "w1", "answer": ["a"]}], Mapping(), r"field 'answer' \(the answer\) must be a string or a number"),
    ([{"prompt": "w1", "idx": 1.5}], Mapping(), r"field 'idx' \(the id\) must be a string or an integer, got float"),
    ([{"text": "w1", "label": 2}], Mapping(), r"line 1: record has neither a prompt nor messages .*its fields are "
                                              r"'text', 'label'\); name one with --prompt-field"),
    ([{"question": "w1", "messages": [{"role": "user", "content": "w1"}]}], Mapping(),
     r"line 1: record has both of 'question' \(a prompt\) and 'messages'"),
    ([{"conversations": [{"from": "gpt", "value": "w1"}]}], Mapping(), r"holds only assistant turns"),
    ([{"messages": [{"role": "user"}]}], Mapping(), r"field 'messages'\[0\] must be an object"),
    ([[1, 2]], Mapping(), r"line 1: a record must be an object"),
    ([{"prompt": None, "answer": "3"}], Mapping(), r"line 1: field 'prompt' is null \(empty\) in this record"),
    ([{"text": None}], Mapping(prompt="text"), r"line 1: field 'text' is null \(empty\)"),
    ([{"prompt": "w1", "gold": None}], Mapping(answer="gold"), r"line 1: field 'gold' \(--answer-field\) is null"),
    ([{"prompt": "w1", "answer": float("nan")}], Mapping(), r"field 'answer' \(the answer\) is nan, not an answer"),
    ([{"messages": [{"role": "system", "content": "w1"}, {"role": "assistant", "content": "w2"}]}], Mapping(),
     r"field 'messages' holds no user turn \(system\)"),
    ([{"messages": [{"role": "user", "content": "w1"}, {"role": "Model", "content": "w2"}]}], Mapping(),
     r"field 'messages'\[1\] has the role 'Model'; the roles are system, user, assistant, tool \(ShareGPT"),
])
def test_bad_mappings_name_the_source_record_and_field(tmp_path, records, mapping, message):
    with pytest.raises(InputError, match=message):
        read_prompts(write_jsonl(tmp_path / "p.jsonl", records), mapping)


def test_a_null_field_is_a_missing_one_and_known_roles_pass(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": None, "messages": [{"role": "user", "content": "w1"}], "answer": None, "note": None},
        {"conversations": [{"from": "system", "value": "w1"}, {"from": "human", "value": "w2"},
                           {"from": "tool", "value": "w3"}, {"from": "gpt", "value": "w4"}]}])
    first, second = read_prompts(path)
    assert (first.prompt, first.messages, first.answer, first.metadata) == (
        None, ({"role": "user", "content": "w1"},), None, {})
    assert [m["role"] for m in second.messages] == ["system", "user", "tool"]  # the trailing reply is dropped


def test_metadata_that_is_not_finite_is_written_as_null(tmp_path, tiny_model):
    """A NaN (a float column's missing value, or JSON's non-standard NaN) is null in the store: standard JSON."""
    from tests.helpers import do_rollout, read_rows

    pq.write_table(pa.table({"prompt": ["w1", "w2"], "score": [float("nan"), 1.5]}), tmp_path / "p.parquet")
    assert [r.metadata for r in read_prompts(tmp_path / "p.parquet")] == [{"score": None}, {"score": 1.5}]
    (tmp_path / "p.jsonl").write_text('{"prompt": "w1", "extra": {"v": [Infinity, 1], "w": -Infinity}}\n')
    [record] = read_prompts(tmp_path / "p.jsonl")
    assert record.metadata == {"extra": {"v": [None, 1], "w": None}}
    do_rollout(tiny_model, tmp_path / "p.parquet", tmp_path / "r", max_new_tokens=2)

    def strict(constant):
        raise AssertionError(f"{constant} written into JSON")

    stored = [json.loads(row["metadata"], parse_constant=strict) for row in read_rows(tmp_path / "r")]
    assert stored == [{"score": None}, {"score": 1.5}]
    json.loads((tmp_path / "r" / "manifest.json").read_text(), parse_constant=strict)


@pytest.mark.slow
def test_the_mapping_is_part_of_the_prompt_fingerprint(tmp_path, tiny_model):
    """The same file read with another mapping is other prompts: the stores say so."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "w1 w2", "title": "w3", "answer": "4"}])
    fingerprints = []
    for i, extra in enumerate(([], ["--prompt-field", "title"])):
        run_cli("rollout", "--model", str(tiny_model), "--prompts", str(path), "--out", str(tmp_path / f"r{i}"),
                "--max-new-tokens", "2", *extra)
        fingerprints.append(last_json(run_cli("inspect", str(tmp_path / f"r{i}")))["prompts"])
    a, b = fingerprints
    assert a["content_fingerprint"] == b["content_fingerprint"] and a["fingerprint"] != b["fingerprint"]
    assert a["fields"]["prompt"] is None and b["fields"]["prompt"] == "title"


def test_save_to_disk_directories(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the datasets extra is not installed")
    data = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"problem": ["w1", "w2"], "solution": ["\\boxed{1}", "\\boxed{2}"]}),
        "test": datasets.Dataset.from_dict({"problem": ["w3"], "solution": ["\\boxed{3}"]})})
    data.save_to_disk(str(tmp_path / "ds"))
    test = read_prompts(Source(str(tmp_path / "ds"), split="test"))
    assert [(r.prompt, r.answer) for r in test] == [("w3", "\\boxed{3}")]
    assert len(read_prompts(Source(str(tmp_path / "ds")))) == 2  # train by default
    with pytest.raises(InputError, match="--split dev: .* has splits train, test"):
        read_prompts(Source(str(tmp_path / "ds"), split="dev"))


@pytest.mark.slow
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
                   "--trust-remote-code", "--split", "--subset", "--prompt-field", "--messages-field",
                   "--answer-field", "--id-field", "--chat", "--system-prompt", "--chat-template-kwargs",
                   "--max-prompt-tokens", "--long-prompts"):
        assert option in out
    assert "inspect" in run_cli("--help").stdout
