"""The lm_eval client (eval/accuracy/lm_eval_client.py) against direct computations with forward
and generate, and end to end through ``lm_eval.simple_evaluate`` on a local task
(tests/data/lm_eval/)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="lm_eval is not installed (it is in the `test` extra)")

import datasets.config  # noqa: E402
import huggingface_hub.constants  # noqa: E402
import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import loraswitch_jax as lj  # noqa: E402
from loraswitch_jax.eval.accuracy.lm_eval_client import LoraSwitchLM  # noqa: E402
from loraswitch_jax.tokenizer import byte_tokenizer  # noqa: E402
from tests.helpers import jit_forward, random_params  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
TASK = "loraswitch_tiny_mc"
TASK_DIR = os.path.join(REPO, "tests", "data", "lm_eval")
# Byte tokenizer ids: 0-255 bytes, 256 <s>, 257 </s>, 258 <pad> (as the demo preset).
CFG = lj.LlamaConfig(
    vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    bos_token_id=256, eos_token_id=(257,), pad_token_id=258,
)
BOS = 256
BATCH = 4


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No hub access: the local task must load from its jsonl alone."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def params():
    return random_params(CFG, seed=0, dtype=jnp.float32)


@pytest.fixture(scope="module")
def adapter():
    """A switch adapter with every leaf random (a fresh one has B = 0 and changes nothing).

    Drawn with numpy on the shapes of ``init_adapter`` (no eager jax ops to compile).
    """
    acfg = lj.AdapterConfig(mode="switch", rank=4, num_experts=4, top_k=2)
    abstract = jax.eval_shape(lambda: lj.init_adapter(CFG, acfg, jax.random.key(1)))
    rng = np.random.RandomState(2)
    return jax.tree.map(
        lambda x: jnp.asarray(0.5 * rng.standard_normal(x.shape), x.dtype), abstract
    )


@pytest.fixture(scope="module")
def lm(params):
    return LoraSwitchLM(params, CFG, byte_tokenizer(), batch_size=BATCH, max_gen_toks=12)


def ll_request(context: str, continuation: str) -> Instance:
    return Instance("loglikelihood", {}, (context, continuation), 0)


def token_logprobs(params, inputs: list[int], adapter=None) -> tuple[np.ndarray, np.ndarray]:
    """``log p(next token)`` rows ``[T, V]`` (float64) and argmax ``[T]`` for one unpadded row."""
    logits = jit_forward()(params, jnp.asarray([inputs], jnp.int32), CFG, adapter=adapter)
    logits = np.asarray(logits[0], np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True)), logits.argmax(-1)


def direct_score(params, context: list[int], continuation: list[int], adapter=None):
    """``(sum log p(continuation | context), continuation is the argmax path)``, no padding."""
    logprobs, argmax = token_logprobs(params, context + continuation[:-1], adapter)
    rows = np.arange(len(context) - 1, len(context) + len(continuation) - 1)
    return logprobs[rows, continuation].sum(), bool((argmax[rows] == continuation).all())


# ---------------------------------------------------------------------------- loglikelihood


def test_loglikelihood_matches_forward(lm, params):
    tok = lm.tokenizer
    # Equal lengths (11 tokens with BOS): one compiled reference forward.
    pairs = [("The cat", " is"), ("", "abcdefghij"), ("Hello,", " wor")]
    got = lm.loglikelihood([ll_request(c, x) for c, x in pairs])
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        whole = tok.encode(context + continuation)
        ctx = tok.encode(context) if context else [BOS]
        cont = whole[len(ctx):] if context else tok.encode(continuation, add_special_tokens=False)
        want, want_greedy = direct_score(params, ctx, cont)
        np.testing.assert_allclose(logprob, want, rtol=1e-5)
        assert greedy == want_greedy


def test_is_greedy(lm, params):
    context = lm.tok_encode("Once up")
    path = []
    for _ in range(3):  # the model's own greedy continuation (causal: right zeros change nothing)
        inputs = context + path
        _, argmax = token_logprobs(params, inputs + [0] * (10 - len(inputs)))
        path.append(int(argmax[len(inputs) - 1]))
    wrong = path[:2] + [(path[2] + 1) % 256]
    (lp_path, greedy_path), (lp_wrong, greedy_wrong) = lm._loglikelihood_tokens(
        [(None, context, path), (None, context, wrong)]
    )
    assert greedy_path and not greedy_wrong
    assert lp_path > lp_wrong


def test_batching_and_padding_do_not_change_results(lm):
    short = ll_request("ab", " c")
    # Alone: width 16, row 0. In a batch: after a longer row (width 64) and in a later row.
    others = [ll_request("x" * 40, " long one"), ll_request("yz", " w"), ll_request("q", "rs")]
    (alone,) = lm.loglikelihood([short])
    in_batch = lm.loglikelihood(others + [short] + others)
    np.testing.assert_allclose(in_batch[3][0], alone[0], rtol=1e-5)
    assert in_batch[3][1] == alone[1]
    np.testing.assert_allclose(
        [r[0] for r in in_batch[:3]], [r[0] for r in in_batch[4:]], rtol=1e-5
    )


def test_long_context_is_cut_from_the_left(params):
    lm = LoraSwitchLM(params, CFG, byte_tokenizer(), batch_size=BATCH, max_length=16)
    context, continuation = "0123456789" * 3, " ok"
    [(logprob, _)] = lm.loglikelihood([ll_request(context, continuation)])
    whole = lm.tok_encode(context + continuation)[-17:]  # max_length + 1 tokens
    want, _ = direct_score(params, whole[:-3], whole[-3:])
    np.testing.assert_allclose(logprob, want, rtol=1e-5)


# ---------------------------------------------------------------------------- rolling


def test_rolling_in_one_window_is_the_full_sum(lm, params):
    text = "ten bytes!"  # 10 tokens: the same compiled reference as above
    ids = lm.tok_encode(text, add_special_tokens=False)
    logprobs, _ = token_logprobs(params, [BOS] + ids[:-1])
    want = logprobs[np.arange(len(ids)), ids].sum()
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_rolling_across_windows(params):
    """19 tokens in windows of 8 (lm_eval's LM.loglikelihood_rolling docstring): predict t0..t7
    from BOS t0..t6, t8..t15 from t7..t14, and the last 3 with a full window t10..t17."""
    lm = LoraSwitchLM(params, CFG, byte_tokenizer(), batch_size=BATCH, max_length=8)
    text = "nineteen bytes long"
    t = lm.tok_encode(text, add_special_tokens=False)
    assert len(t) == 19

    windows = [([BOS] + t[0:7], t[0:8]), (t[7:15], t[8:16]), (t[10:18], t[16:19])]
    want = 0.0
    for inputs, predicted in windows:
        logprobs, _ = token_logprobs(params, inputs)
        rows = np.arange(8 - len(predicted), 8)
        want += logprobs[rows, predicted].sum()
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # A window of 8 sees less context than one window over everything: a different number.
    (whole,) = LoraSwitchLM(params, CFG, byte_tokenizer(), batch_size=BATCH).loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (text,), 0)]
    )
    assert abs(whole - got) > 1e-3


# ---------------------------------------------------------------------------- generate_until


def gen_request(context: str, **gen_kwargs) -> Instance:
    return Instance("generate_until", {}, (context, gen_kwargs), 0)


def test_generate_until_matches_generate(lm, params):
    contexts = ["Once upon a time", "ab", "xyz", "The end"]  # a full batch: one compile for both
    got = lm.generate_until(
        [gen_request(c, until=[], max_gen_toks=10, do_sample=False) for c in contexts]
    )
    gen = lj.GenerateConfig(max_new_tokens=10, cache_len=64)
    ref = lj.generate(params, CFG, [lm.tok_encode(c) for c in contexts], gen)
    for text, tokens in zip(got, ref.as_lists()):
        assert text == lm.tok_decode([t for t in tokens if t not in CFG.eos_token_id])
    # A stop string from the middle of the first text cuts it there; max_gen_toks is honoured.
    full = got[0]
    assert len(full) >= 4, f"too short a greedy text to cut: {full!r}"
    stop = full[2:4]
    cut, short = lm.generate_until([
        gen_request(contexts[0], until=["no such text", stop], max_gen_toks=10),
        gen_request(contexts[0], until=[], max_gen_toks=3),
    ])
    assert cut == full[: full.index(stop)]
    assert short == lm.tok_decode([t for t in ref.as_lists()[0][:3] if t not in CFG.eos_token_id])


def test_sampling_without_a_temperature(lm):
    """lm_eval passes do_sample=True without a temperature: sample at temperature 1."""
    (text,) = lm.generate_until([gen_request("ab", until=[], max_gen_toks=3, do_sample=True)])
    assert isinstance(text, str)


def test_generate_until_rejects_unsupported_arguments(lm):
    with pytest.raises(ValueError, match="num_beams"):
        lm.generate_until([gen_request("x", until=[], num_beams=4)])
    with pytest.raises(ValueError, match="max_gen_toks=200 leaves no room"):
        lm.generate_until([gen_request("x", until=[], max_gen_toks=200)])


# ---------------------------------------------------------------------------- construction


def test_constructor_errors(params):
    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="batch_size='auto' is not supported"):
        LoraSwitchLM(params, CFG, tok, batch_size="auto")
    with pytest.raises(ValueError, match="max_length must be in"):
        LoraSwitchLM(params, CFG, tok, max_length=CFG.max_position_embeddings + 1)
    with pytest.raises(ValueError, match="unknown impl"):
        LoraSwitchLM(params, CFG, tok, impl="cuda")
    with pytest.raises(ValueError, match=r"unsupported loraswitch model_args \['pretrained'\]"):
        LoraSwitchLM.create_from_arg_string("pretrained=gpt2,batch_size=2")
    with pytest.raises(ValueError, match="dtype='float16' is not supported"):
        LoraSwitchLM.create_from_arg_string("model=demo,dtype=float16")


# ---------------------------------------------------------------------------- end to end


def evaluate(model, **kwargs) -> dict:
    """``simple_evaluate`` on the local task; returns the results with per-sample responses."""
    out = lm_eval.simple_evaluate(
        model=model,
        tasks=[TASK],
        task_manager=TaskManager(include_path=TASK_DIR, include_defaults=False),
        log_samples=True,
        **kwargs,
    )
    metrics = out["results"][TASK]
    for name in ("acc,none", "acc_norm,none"):
        assert 0.0 <= metrics[name] <= 1.0, (name, metrics)
    return out


def responses(out: dict) -> np.ndarray:
    """Each sample's per-choice log-likelihoods, ``[docs, choices]``."""
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return np.array([[float(r[0][0]) for r in s["resps"]] for s in samples])


def test_simple_evaluate_local_task(lm, params, adapter, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the task's data_files path is relative to the repository root
    base = evaluate(lm)
    assert responses(base).shape == (6, 4)

    # The command-line path: model name + model_args string, loading folders from disk;
    # lm_eval's --batch_size default (1) must not override batch_size in model_args.
    model_dir, adapter_dir = tmp_path / "model", tmp_path / "adapter"
    lj.save_params(params, CFG, model_dir)
    byte_tokenizer().save(model_dir)
    lj.save_adapter(adapter, adapter_dir, CFG)
    adapted = evaluate(
        "loraswitch",
        model_args=f"model={model_dir},adapter={adapter_dir},dtype=float32,batch_size={BATCH}",
        batch_size=1,
        device="cuda:0",
    )
    assert not np.allclose(responses(adapted), responses(base), atol=1e-3)
    run_settings = {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"}
    from_args = LoraSwitchLM.create_from_arg_string
    assert from_args(f"model={model_dir},batch_size=3", run_settings).batch_size == 3
    assert from_args(f"model={model_dir}", run_settings).batch_size == 1

    # The adapter run equals direct scoring with the in-memory adapter.
    doc = sorted(adapted["samples"][TASK], key=lambda s: s["doc_id"])[0]
    context, continuation = doc["arguments"][0]
    ctx = lm.tok_encode(context)
    cont = lm.tok_encode(context + continuation)[len(ctx):]
    want, _ = direct_score(params, ctx, cont, adapter)
    np.testing.assert_allclose(responses(adapted)[0, 0], want, rtol=1e-5)
