"""`--checker`: a user's own Python function (by module or by file), reasoning-gym's scoring, and
`lightopd prompts` writing task and dataset records that need no flags later."""

from __future__ import annotations

import json
import multiprocessing
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightopd.data.prompts import read_prompts
from lightopd.errors import InputError
from lightopd.tasks.isolated import CheckerProcess
from lightopd.tasks.verifiers import open_verifier
from tests.helpers import last_json, run_cli, write_jsonl

pytestmark = pytest.mark.slow  # end-to-end runs of real processes: `make test-fast` leaves them out

CHECKER = '''
def by_level(completion, reference, metadata):
    """Correct exactly when the record's level is 2: a verdict the completion cannot change."""
    return metadata["level"] == 2

def scored(completion, reference, metadata):
    return (1.0 if metadata["level"] == 2 else 0.25), "read"

def broken(completion, reference, metadata):
    return metadata["missing"]

def unsure(completion, reference, metadata):
    return "maybe"
'''


@pytest.fixture
def checker_file(tmp_path):
    path = tmp_path / "my_checks.py"
    path.write_text(CHECKER)
    return path


@pytest.fixture
def level_prompts(tmp_path):
    return write_jsonl(tmp_path / "p.jsonl", [{"prompt": "w1", "answer": "x", "level": 1},
                                              {"prompt": "w2", "answer": "y", "level": 2}])


def test_a_user_checker_decides_every_verdict(tiny_model, checker_file, level_prompts, tmp_path):
    for function, extracted in (("by_level", None), ("scored", "read")):
        result = last_json(run_cli("eval", "--model", str(tiny_model), "--prompts", str(level_prompts), "--n", "2",
                                   "--max-new-tokens", "2", "--checker", f"{checker_file}:{function}",
                                   "--log-samples", str(tmp_path / "s.jsonl")))
        assert result["accuracy"] == 0.5 and result["pass@k"]["2"] == 0.5
        logged = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
        assert [(s["prompt_id"], s["correct"], s["extracted"]) for s in logged] == [
            ("0", False, extracted), ("0", False, extracted), ("1", True, extracted), ("1", True, extracted)]
        assert logged[0]["metadata"] == {"level": 1} and logged[0]["reference"] == "x"


def test_a_checker_by_module_name_is_imported_from_the_working_directory(checker_file, monkeypatch):
    monkeypatch.chdir(checker_file.parent)
    monkeypatch.syspath_prepend(str(checker_file.parent))
    with open_verifier("my_checks:by_level", 10) as verify:
        assert verify("anything", "x", {"level": 2}, "w1") == (True, None)
        assert verify("anything", "x", {"level": 1}, "w1") == (False, None)


@pytest.mark.parametrize("name,message", [
    ("broken", r"p.jsonl line 1, sample 0: --checker .*:broken raised KeyError: 'missing'"),
    ("unsure", r"returned 'maybe'; it must return a bool, a number, or a pair"),
    ("absent", r"has no function 'absent'"),
])
def test_a_failing_user_checker_exits_2_naming_it(tiny_model, checker_file, level_prompts, name, message):
    proc = run_cli("eval", "--model", str(tiny_model), "--prompts", str(level_prompts), "--max-new-tokens", "2",
                   "--checker", f"{checker_file}:{name}", check=False)
    assert proc.returncode == 2, proc.stderr
    assert re.search(message, " ".join(proc.stderr.split())), proc.stderr


def test_an_unimportable_checker_module_is_named(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="--checker no_such_module:f: cannot import no_such_module"):
        with open_verifier("no_such_module:f", 10):
            pass


UNRULY = '''
import os, sys, time
import numpy as np

calls = 0

def exits(completion, reference, metadata):
    sys.exit(0)

def dies(completion, reference, metadata):
    os._exit(3)

def hangs(completion, reference, metadata):
    time.sleep(600)

def fourth_hangs(completion, reference, metadata):
    """Returns thrice, then writes its process id where the record says and never returns."""
    global calls
    calls += 1
    if calls == 4:
        with open(metadata["pid_file"], "w") as f:
            f.write(str(os.getpid()))
        time.sleep(600)
    return True

def nan(completion, reference, metadata):
    return float("nan")

def chatty(completion, reference, metadata):
    print("checking", completion)
    return True

def generator(completion, reference, metadata):
    return (c for c in completion)

def numpy_bool(completion, reference, metadata):
    return np.bool_(completion == reference), np.int64(7)

def numpy_score(completion, reference, metadata):
    return np.float32(1.0 if completion == reference else 0.5)

def as_told(completion, reference, metadata):
    if metadata.get("hang"):
        time.sleep(600)
    if metadata.get("exit"):
        os._exit(1)
    return completion == reference
'''


@pytest.fixture
def unruly(tmp_path):
    path = tmp_path / "unruly.py"
    path.write_text(UNRULY)
    return path


def gone(pid: int) -> bool:
    """Whether a process has ended (a zombie left to init counts: it runs no more)."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize("name,message", [
    ("exits", "called sys.exit(0); a checker must return its verdict"),
    ("dies", "ended the checker process (exit code 3) instead of returning a verdict"),
    ("hangs", "did not return within 1 s; fix it or raise --checker-timeout"),
    ("nan", "returned nan; a number it returns must be finite"),
    ("generator", "returned a generator, which lightopd does not take back from a checker"),
])
def test_a_user_checker_cannot_take_lightopd_with_it(unruly, name, message):
    start = time.monotonic()
    with open_verifier(f"{unruly}:{name}", 1) as verify:
        with pytest.raises(InputError, match=re.escape(f"--checker {unruly}:{name} {message}")):
            verify("w1", "w1", {}, "w1")
    assert time.monotonic() - start < 30
    assert multiprocessing.active_children() == []  # the worker is reaped


def test_numpy_bools_and_numbers_are_verdicts(unruly):
    with open_verifier(f"{unruly}:numpy_bool", 10) as verify:
        assert verify("w1", "w1", {}, "w1") == (True, "7") and verify("w1", "w2", {}, "w1") == (False, "7")
    with open_verifier(f"{unruly}:numpy_score", 10) as verify:
        assert verify("w1", "w1", {}, "w1") == (True, None) and verify("w1", "w2", {}, "w1") == (False, None)


def test_one_worker_serves_every_call_and_a_new_one_follows_a_hang_or_a_crash(unruly):
    with CheckerProcess(f"{unruly}:as_told", 1) as checker:
        first = checker._process.pid
        assert checker("w1", "w1", {}) is True and checker("w1", "w2", {}) is False
        assert checker._process.pid == first  # one process for the whole run
        with pytest.raises(InputError, match="did not return within 1 s"):
            checker("w1", "w1", {"hang": True})
        assert gone(first) and checker("w1", "w1", {}) is True
        with pytest.raises(InputError, match=r"ended the checker process \(exit code 1\)"):
            checker("w1", "w1", {"exit": True})
        assert checker("w1", "w2", {}) is False
        last = checker._process.pid
    assert gone(last) and multiprocessing.active_children() == []


def test_a_checker_that_exits_stops_eval_with_exit_2_naming_the_sample(tiny_model, unruly, level_prompts, tmp_path):
    out = tmp_path / "r.json"
    proc = run_cli("eval", "--model", str(tiny_model), "--prompts", str(level_prompts), "--max-new-tokens", "2",
                   "--checker", f"{unruly}:exits", "--out", str(out), check=False)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {level_prompts} line 1, sample 0: --checker "
                                                    f"{unruly}:exits called sys.exit(0); a checker must return its "
                                                    "verdict")
    assert not out.exists()


def test_what_a_checker_prints_goes_to_stderr_and_stdout_keeps_one_json_line(tiny_model, unruly, level_prompts):
    proc = run_cli("eval", "--model", str(tiny_model), "--prompts", str(level_prompts), "--max-new-tokens", "2",
                   "--checker", f"{unruly}:chatty")
    assert len(proc.stdout.splitlines()) == 1 and json.loads(proc.stdout)["command"] == "eval"
    assert "checking" in proc.stderr


def test_a_hanging_checker_is_ended_after_checker_timeout(tiny_model, unruly, tmp_path):
    pid_file = tmp_path / "worker.pid"
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p, "answer": "x", "pid_file": str(pid_file)}
                                                 for p in ("w1", "w2")])
    start = time.monotonic()
    proc = run_cli("eval", "--model", str(tiny_model), "--prompts", str(prompts), "--max-new-tokens", "2", "--n", "2",
                   "--checker", f"{unruly}:fourth_hangs", "--checker-timeout", "1", check=False)
    assert time.monotonic() - start < 60
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"p.jsonl line 2, sample 1: --checker {unruly}:fourth_hangs did not return within 1 s; fix it or raise " \
           "--checker-timeout" in " ".join(proc.stderr.split())
    assert gone(int(pid_file.read_text()))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the worker dies with lightopd through prctl")
def test_a_killed_eval_leaves_no_checker_behind(tiny_model, unruly, tmp_path):
    pid_file = tmp_path / "worker.pid"
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "w1", "answer": "x", "pid_file": str(pid_file)}])
    proc = subprocess.Popen([sys.executable, "-m", "lightopd", "eval", "--model", str(tiny_model), "--prompts",
                             str(prompts), "--max-new-tokens", "2", "--n", "4", "--checker", f"{unruly}:fourth_hangs",
                             "--checker-timeout", "300"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        worker = int(pid_file.read_text())
        assert not gone(worker)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 10
    while not gone(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(worker)


def test_reasoning_gym_records_and_checker(tmp_path, tiny_model):
    pytest.importorskip("reasoning_gym", reason="the reasoning-gym extra is not installed")
    out = tmp_path / "chain.jsonl"
    result = last_json(run_cli("prompts", "reasoning-gym:chain_sum", "--n", "6", "--seed", "3", "--out", str(out)))
    assert result["records"] == 6 and result["fields"] == ["answer", "id", "metadata", "question"]
    records = read_prompts(out)  # no flags: question is the prompt, answer the answer, metadata kept
    assert all(r.prompt.startswith("State the final answer") for r in records)
    with open_verifier("reasoning-gym", 10) as verify:
        for r in records:
            assert r.metadata["source_dataset"] == "chain_sum" and "metadata" not in r.metadata  # not nested
            assert verify(f"so <answer>{r.answer}</answer>", r.answer, r.metadata, r.prompt)[0] is True
            assert verify(f"<answer>{int(r.answer) + 1}</answer>", r.answer, r.metadata, r.prompt)[0] is False
            assert verify(r.answer, r.answer, r.metadata, r.prompt)[0] is True  # no tag: the whole completion
            nested = {"metadata": r.metadata}  # as a store written before the metadata was flattened keeps it
            assert verify(f"<answer>{r.answer}</answer>", r.answer, nested, r.prompt)[0] is True
    again = tmp_path / "again.jsonl"
    run_cli("prompts", "reasoning-gym:chain_sum", "--n", "6", "--seed", "3", "--out", str(again))
    assert again.read_text() == out.read_text()  # the seed fixes the records
    proc = run_cli("prompts", "reasoning-gym:chain_sum", "--n", "6", "--out", str(out), check=False)
    assert proc.returncode == 2 and "exists" in proc.stderr
    evaluated = last_json(run_cli("eval", "--model", str(tiny_model), "--prompts", str(out), "--max-new-tokens", "3",
                                  "--checker", "reasoning-gym"))
    assert evaluated["accuracy"] == 0.0 and evaluated["prompts_evaluated"] == 6  # a random model reads no sums


def test_reasoning_gym_tasks_are_listed_and_configured(tmp_path):
    pytest.importorskip("reasoning_gym", reason="the reasoning-gym extra is not installed")
    proc = run_cli("prompts", "reasoning-gym:chain_sums", "--out", str(tmp_path / "x.jsonl"), check=False)
    assert proc.returncode == 2 and "no such task" in proc.stderr and "chain_sum," in proc.stderr
    assert not (tmp_path / "x.jsonl").exists()
    out = tmp_path / "hard.jsonl"
    run_cli("prompts", "reasoning-gym:chain_sum", "--n", "4", "--out", str(out),
            "--task-config", '{"min_terms": 5, "max_terms": 5}')
    records = read_prompts(out)
    assert [r.metadata["num_terms"] for r in records] == [5] * 4
    assert all(r.prompt.count(" + ") + r.prompt.count(" - ") == 4 for r in records)
    for config, message in (('{"bogus": 1}', "unexpected keyword argument 'bogus'"), ("[1]", "a JSON object"),
                            ("{", "not JSON")):
        proc = run_cli("prompts", "reasoning-gym:chain_sum", "--out", str(tmp_path / "y.jsonl"),
                       "--task-config", config, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_prompts_from_a_source_with_a_mapping_need_no_flags_later(tmp_path):
    source = write_jsonl(tmp_path / "src.jsonl", [
        {"uid": "a", "text": "w1 w2", "gold": "#### 3", "topic": "sums"},
        {"uid": "b", "text": "w3", "gold": "#### 4", "topic": "sums"}])
    out = tmp_path / "p.jsonl"
    result = last_json(run_cli("prompts", str(source), "--prompt-field", "text", "--answer-field", "gold",
                               "--out", str(out)))
    assert result["records"] == 2
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written[0] == {"id": "a", "prompt": "w1 w2", "answer": "#### 3", "topic": "sums"}
    assert [(r.id, r.prompt, r.answer, r.metadata) for r in read_prompts(out)] == [
        ("a", "w1 w2", "#### 3", {"topic": "sums"}), ("b", "w3", "#### 4", {"topic": "sums"})]
