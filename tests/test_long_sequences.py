"""Long sequences: the chunked loss (differentiated chunk by chunk), activation checkpointing, padding-free
packing and the KV-cache budget of decoding, each against the plain computation it replaces."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightopd import objectives as O
from lightopd.data.batching import MicroBatch, pack_by_tokens, pack_rows, plan_generation
from lightopd.engine.forward import CompletionChunks
from lightopd.engine.generate import kv_bytes_per_token
from lightopd.engine.models import without_dropout
from lightopd.objectives.divergences import DivergenceParams, JSDParams
from lightopd.objectives.policy_gradient import PolicyGradientParams
from lightopd.tiny import default_words, make_model
from lightopd.training.chunk import chunk_loss
from lightopd.training.trainer import checkpointing
from tests.helpers import do_train, metrics, weights

V, K = 300, 8
OBJECTIVES = [("rkl", DivergenceParams(temperature=0.6)), ("jsd", JSDParams(beta=0.3, temperature=0.6)),
              ("lightning-opd", PolicyGradientParams(temperature=0.6)), ("sft", O.ObjectiveParams(temperature=1.0))]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model_dir(request, tmp_path_factory):
    return make_model(tmp_path_factory.mktemp(request.param) / "m", default_words(V - 10), arch=request.param,
                      hidden=32, layers=2, context=256, seed=0)


def load(path, dtype=torch.float64):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    without_dropout(model)
    return model.train()


def rows(seed=0, count=5):
    """Prompts and completions whose lengths vary about 10x, and a confident teacher's stored columns."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(4, V, (int(n),), generator=g).tolist()
               for n in torch.randint(2, 12, (count,), generator=g)]
    completions = [torch.randint(4, V, (int(n),), generator=g).tolist()
                   for n in torch.randint(3, 40, (count,), generator=g)]
    n = sum(map(len, completions))
    targets = torch.tensor([t for c in completions for t in c])
    teacher = torch.log_softmax(torch.randn(n, V, generator=g, dtype=torch.float64) * 6, -1)
    top_lp, top_ids = teacher.topk(K, -1)
    stored = {"teacher_logprobs": teacher.gather(-1, targets[:, None]).squeeze(-1).float(),
              "behavior_logprobs": -torch.rand(n, generator=g),
              "topk_ids": top_ids, "topk_logprobs": top_lp.float(),
              "teacher_log_tail": teacher.scatter(-1, top_ids, float("-inf")).logsumexp(-1).float()}
    return prompts, completions, stored


def loss_and_grads(model, objective, prompts, completions, stored, *, packed=False, chunk=None):
    """The token-mean loss of one micro-batch (as a training step takes it) and its gradients: chunked
    (engine.chunks, each chunk differentiated on its own) when `chunk` is given, else from the model's
    own full logits."""
    layout = pack_rows(prompts, completions, "cpu", packed)
    dtype = next(model.parameters()).dtype
    mb = MicroBatch(list(range(len(prompts))), layout,
                    {k: v if k == "topk_ids" else v.to(dtype) for k, v in stored.items()})
    per_chunk = chunk_loss(objective, mb, {})
    if chunk is None:
        full = model(**layout.inputs, use_cache=False).logits[layout.rows, layout.cols, :V]
        loss = per_chunk(full, 0, len(layout.targets))[0].mean()
    else:
        total, chunks = CompletionChunks(model, V)(layout, per_chunk, chunk)
        assert len(chunks) == -(-len(layout.targets) // chunk)
        loss = total / len(layout.targets)
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("name,params", OBJECTIVES, ids=[n for n, _ in OBJECTIVES])
def test_chunked_loss_has_the_gradients_of_the_unchunked_one(model_dir, name, params):
    """float64: 3-position chunks, each differentiated on its own, against the full [tokens x vocab] logits."""
    model = load(model_dir)
    prompts, completions, stored = rows()
    objective = O.OBJECTIVES[name](params)
    ref_loss, ref = loss_and_grads(model, objective, prompts, completions, stored)
    got_loss, got = loss_and_grads(model, objective, prompts, completions, stored, chunk=3)
    assert float(got_loss) == pytest.approx(float(ref_loss), rel=1e-10)
    assert any(bool(g.abs().max() > 1e-4) for g in ref)  # a real gradient, not zeros
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_packed_rows_give_the_loss_and_gradients_of_padded_rows(model_dir):
    """float32 on CPU (SDPA): one packed row with position ids restarting per sequence. (The two differ
    by about 2e-6, less than either differs from the float64 computation.)"""
    model = load(model_dir, torch.float32)
    assert CompletionChunks(model, V).positions.packs
    prompts, completions, stored = rows(seed=1, count=6)
    objective = O.OBJECTIVES["rkl"](DivergenceParams(temperature=0.6))
    padded_loss, padded = loss_and_grads(model, objective, prompts, completions, stored, chunk=16)
    packed_loss, packed = loss_and_grads(model, objective, prompts, completions, stored, chunk=16, packed=True)
    assert float(packed_loss) == pytest.approx(float(padded_loss), rel=1e-5)
    for a, b in zip(packed, padded, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_keeps_the_gradients(model_dir):
    model = load(model_dir)
    prompts, completions, stored = rows(seed=2)
    objective = O.OBJECTIVES["jsd"](JSDParams(temperature=0.6))
    plain_loss, plain = loss_and_grads(model, objective, prompts, completions, stored, chunk=7)
    checkpointing(model)
    ckpt_loss, ckpt = loss_and_grads(model, objective, prompts, completions, stored, chunk=7)
    assert float(ckpt_loss) == float(plain_loss)
    for a, b in zip(ckpt, plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_packed_micro_batches_count_real_tokens():
    lengths = [100, 7, 50, 30, 300, 20, 45, 5]
    batches = pack_by_tokens(lengths, 100, packed=True)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # every row once
    for b in batches:
        assert sum(lengths[i] for i in b) <= 100 or len(b) == 1  # a row over the budget alone
    assert [4] in batches and len(batches) == 4  # 557 real tokens: 300 | 100 | 50+45+5 | 30+20+7
    padded = pack_by_tokens(lengths, 100)
    assert len(padded) > len(batches)  # padded batches count their padding


def test_decoding_batches_respect_the_kv_cache_budget():
    lengths, n, max_new = [40, 10, 25, 5, 60], 4, 20
    plan = plan_generation(lengths, n, batch_size=64, kv_tokens=300, max_new=max_new)
    pieces = sorted((i, j) for batch in plan for i, js in batch for j in js)
    assert pieces == [(i, j) for i in range(len(lengths)) for j in range(n)]  # every sample once
    for batch in plan:
        rows = sum(len(js) for _, js in batch)
        longest = max(lengths[i] for i, _ in batch)
        assert rows * (longest + max_new) <= 300 or rows == 1
    assert plan_generation(lengths, n, 64) == [[(4, range(4)), (0, range(4)), (2, range(4)), (1, range(4)),
                                               (3, range(4))]]  # no budget: one batch


def test_kv_bytes_per_token_reads_the_config(model_dir):
    model = load(model_dir, torch.float32)
    config = model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = config.hidden_size // config.num_attention_heads
    assert kv_bytes_per_token(model) == 2 * config.num_hidden_layers * kv_heads * head_dim * 4


@pytest.mark.parametrize("objective", ["opd-seq", "rkl"])
def test_training_packed_takes_the_steps_of_training_padded(objective, consistent_student, teacher_store, tmp_path):
    """Through the trainer: the same steps packed (real tokens per micro-batch) and padded."""
    kw = dict(objective=objective, steps=3, batch_size=4, lr=1e-3, micro_batch_tokens=60)
    packed, _ = do_train(consistent_student, teacher_store, tmp_path / "packed", packing="on", **kw)
    padded, _ = do_train(consistent_student, teacher_store, tmp_path / "padded", packing="off", **kw)
    for a, b in zip(metrics(tmp_path / "packed"), metrics(tmp_path / "padded"), strict=True):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    a, b = weights(tmp_path / "packed"), weights(tmp_path / "padded")
    for key in a:  # Adam's first steps divide by |g|: rounding of tiny gradients shows at a fraction of lr
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=0)


def test_packing_on_with_a_model_that_does_not_pack_pads_and_warns(consistent_student, teacher_store, tmp_path,
                                                                  monkeypatch, capsys):
    from lightopd.engine.forward import PositionLogits

    monkeypatch.setattr(PositionLogits, "packs", property(lambda self: False))
    do_train(consistent_student, teacher_store, tmp_path / "o", packing="on", steps=1, batch_size=4)
    assert "does not read packed rows as separate sequences" in capsys.readouterr().err
