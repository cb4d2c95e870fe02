"""Models and datasets by Hub id, from a Hugging Face cache built here (no network, ever): the
cache layout `models--org--name/snapshots/<commit>/` with `refs/main`, as `hf download` leaves it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lightopd.provenance import model_fingerprint
from tests.helpers import last_json, run_cli, write_jsonl

pytestmark = pytest.mark.slow  # end-to-end runs of real processes: `make test-fast` leaves them out

COMMIT = "0123456789abcdef0123456789abcdef01234567"
NO_NETWORK = "http://127.0.0.1:9"  # any request fails at once


def cache(root: Path, repo: str, files: Path | None = None, kind: str = "models") -> Path:
    """`repo` at COMMIT in the Hugging Face cache under `root` (a copy of `files`); its snapshot."""
    base = root / "hub" / f"{kind}--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / COMMIT
    if files is not None:
        shutil.copytree(files, snapshot)
    else:
        snapshot.mkdir(parents=True)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(COMMIT)
    return snapshot


def hf_env(root: Path, offline: bool = True) -> dict:
    env = {"HF_HOME": str(root), "HF_HUB_CACHE": str(root / "hub"), "HF_ENDPOINT": NO_NETWORK,
           "HF_DATASETS_CACHE": str(root / "datasets")}
    return {**env, "HF_HUB_OFFLINE": "1"} if offline else {**env, "HF_HUB_OFFLINE": "0"}


@pytest.fixture
def hub(tmp_path, tiny_model, teacher_model):
    root = tmp_path / "hf"
    cache(root, "acme/tiny", tiny_model)
    cache(root, "acme/teacher", teacher_model)
    return root


def test_a_model_by_hub_id_is_read_from_the_cache(hub, prompts_file, tmp_path, tiny_model):
    for i, (spec, offline) in enumerate((("acme/tiny", True), (f"acme/tiny@{COMMIT}", True), ("acme/tiny", False))):
        out = tmp_path / f"r{i}"  # online, a cached snapshot is used as it is: no request is made
        run_cli("rollout", "--model", spec, "--prompts", str(prompts_file), "--out", str(out), "--max-new-tokens", "2",
                "--limit", "2", env=hf_env(hub, offline))
        model = last_json(run_cli("inspect", str(out)))["model"]
        assert model["hub_id"] == "acme/tiny" and model["commit"] == COMMIT
        assert model["revision"] == ("main" if "@" not in spec else COMMIT)
        assert model["path"] == str(hub / "hub" / "models--acme--tiny" / "snapshots" / COMMIT)
        assert model["fingerprint"] == model_fingerprint(tiny_model)


def test_a_local_directory_named_like_a_cached_id_wins_and_says_so(hub, prompts_file, tmp_path, plain_model):
    shutil.copytree(plain_model, tmp_path / "acme" / "tiny")
    proc = run_cli("rollout", "--model", "acme/tiny", "--prompts", str(prompts_file), "--out", str(tmp_path / "r"),
                   "--max-new-tokens", "2", "--limit", "1", env=hf_env(hub), cwd=tmp_path)
    message = " ".join(proc.stderr.split())
    assert f"--model acme/tiny: using the local directory {tmp_path / 'acme' / 'tiny'}, not the Hub model" in message
    model = last_json(run_cli("inspect", str(tmp_path / "r")))["model"]
    assert model["local_directory_over_hub_id"] == "acme/tiny" and "hub_id" not in model
    assert model["fingerprint"] == model_fingerprint(plain_model)


def test_a_missing_model_offline_names_the_id_the_cache_and_the_fix(hub, prompts_file, tmp_path):
    proc = run_cli("rollout", "--model", "acme/absent@v2", "--prompts", str(prompts_file), "--out",
                   str(tmp_path / "r"), env=hf_env(hub), check=False)
    message = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stderr
    assert f"--model acme/absent@v2: not in the Hugging Face cache ({hub / 'hub'})" in message
    assert "`hf download acme/absent --revision v2`" in message and "HF_HUB_OFFLINE is set" in message
    assert not (tmp_path / "r").exists()


def test_a_failed_download_is_an_input_error(hub, prompts_file, tmp_path):
    proc = run_cli("rollout", "--model", "acme/absent", "--prompts", str(prompts_file), "--out", str(tmp_path / "r"),
                   env=hf_env(hub, offline=False), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "--model acme/absent: cannot download it from the Hugging Face Hub" in " ".join(proc.stderr.split())


def test_the_consistency_gate_knows_a_teacher_by_id_or_by_path(hub, rollout_store, teacher_model, tiny_model,
                                                                tmp_path):
    env = hf_env(hub)
    store = tmp_path / "t"
    run_cli("score-teacher", "--teacher", "acme/teacher", "--data", str(rollout_store), "--out", str(store),
            "--top-k", "4", env=env)
    assert last_json(run_cli("inspect", str(store)))["teacher"]["hub_id"] == "acme/teacher"
    train = ["train", "--student", str(tiny_model), "--data", str(store), "--steps", "1", "--batch-size", "4"]
    run_cli(*train, "--out", str(tmp_path / "o1"), "--sft-teacher", str(teacher_model), env=env)  # path vs id
    run_cli(*train, "--out", str(tmp_path / "o2"), "--sft-teacher", "acme/teacher", env=env)  # id vs id
    proc = run_cli(*train, "--out", str(tmp_path / "o3"), "--sft-teacher", "acme/tiny", env=env, check=False)
    assert proc.returncode == 2
    assert f"the student's SFT teacher (acme/tiny@{COMMIT[:12]}" in " ".join(proc.stderr.split())


def _gsm_dataset(root: Path) -> None:
    snapshot = cache(root, "acme/gsm", kind="datasets")
    (snapshot / "main").mkdir()
    for split, n in (("test", 3), ("train", 5)):
        pq.write_table(pa.table({"question": [f"w{i} w{i + 1}" for i in range(n)],
                                 "answer": [f"so\n#### {2 * i + 1}" for i in range(n)]}),
                       snapshot / "main" / f"{split}-00000-of-00001.parquet")
    (snapshot / "README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: test\n    path: main/test-*.parquet\n"
        "  - split: train\n    path: main/train-*.parquet\n---\n")


def test_a_dataset_by_hub_id_is_read_from_the_cache(tmp_path, tiny_model):
    pytest.importorskip("datasets", reason="the datasets extra is not installed")
    root = tmp_path / "hf"
    _gsm_dataset(root)
    out = tmp_path / "p.jsonl"
    result = last_json(run_cli("prompts", "hf:acme/gsm", "--subset", "main", "--split", "test", "--out", str(out),
                               env=hf_env(root)))
    assert result["records"] == 3
    assert out.read_text().splitlines()[1] == '{"id": "1", "prompt": "w1 w2", "answer": "so\\n#### 3"}'
    run_cli("rollout", "--model", str(tiny_model), "--prompts", "hf:acme/gsm", "--subset", "main", "--out",
            str(tmp_path / "r"), "--max-new-tokens", "2", env=hf_env(root))
    prompts = last_json(run_cli("inspect", str(tmp_path / "r")))["prompts"]
    assert prompts["count"] == 5 and prompts["split"] is None  # train by default
    assert prompts["content_fingerprint"] == f"hub:acme/gsm@{COMMIT}"
    proc = run_cli("prompts", "hf:acme/absent", "--out", str(tmp_path / "q.jsonl"), env=hf_env(root), check=False)
    assert proc.returncode == 2
    assert "`hf download acme/absent --repo-type dataset`" in " ".join(proc.stderr.split())
    proc = run_cli("prompts", "hf:acme/gsm", "--subset", "main", "--split", "dev", "--out", str(tmp_path / "q.jsonl"),
                   env=hf_env(root), check=False)
    assert proc.returncode == 2 and "dev" in proc.stderr and "(--subset, --split)" in proc.stderr


def test_hub_id_prompt_sources_need_the_datasets_extra(tmp_path, monkeypatch):
    import sys

    from lightopd.data.prompts import read_prompts
    from lightopd.data.sources import Source
    from lightopd.errors import InputError

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(InputError, match=r"pip install 'lightopd\[datasets\]'"):
        read_prompts(Source("hf:acme/gsm"))
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "w1"}])
    assert len(read_prompts(tmp_path / "p.jsonl")) == 1  # files need nothing extra
