"""The training data pipeline: file formats, packing invariants, resume, split, errors."""

from __future__ import annotations

import json
import os

import datasets
import jax.numpy as jnp
import numpy as np
import pytest

import loraswitch_jax as lj
from loraswitch_jax.tokenizer import byte_tokenizer
from loraswitch_jax.train.data import (
    DataConfig,
    DataError,
    DataState,
    EvalBatches,
    TrainBatches,
    load_data,
)
from tests.helpers import jit_forward, random_params

BOS, EOS = 256, 257  # the byte tokenizer's <s>, </s>
TOK = byte_tokenizer()
TEXTS = [f"example {i}: " + "ab" * (i % 7) + "xyz"[: i % 4] for i in range(60)]
PAIRS = [(f"Q{i}: what is {i}+{i}?", f" A: {2 * i}") for i in range(40)]


def write(tmp_path, fmt: str, rows: list[dict], name: str = "data") -> str:
    path = os.path.join(tmp_path, f"{name}.{fmt}")
    if fmt == "jsonl":
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif fmt == "json":  # a JSON array
        with open(path, "w") as f:
            json.dump(rows, f)
    elif fmt == "txt":
        with open(path, "w") as f:
            f.writelines(r["text"] + "\n" for r in rows)
    elif fmt == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(path)
    return path


def load(path, **kw):
    cfg = DataConfig(path=path, **{"seq_len": 32, "batch_size": 4, **kw})
    return cfg, load_data(cfg, TOK, bos_id=BOS, eos_id=(EOS,))


def encoded(text: str) -> list[int]:
    return [BOS] + TOK.encode(text, add_special_tokens=False) + [EOS]


def segments(batch):
    """Yield ``(row, [start, end))`` of each segment in a batch."""
    for b, seg in enumerate(batch["segment_ids"]):
        for s in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == s)
            assert (np.diff(idx) == 1).all(), "a segment is contiguous"
            yield b, idx[0], idx[-1] + 1


def sequences(batches):
    """Each segment's token sequence: its inputs plus its last target."""
    out = []
    for batch in batches:
        for b, i, j in segments(batch):
            out.append(tuple(batch["tokens"][b, i:j]) + (batch["targets"][b, j - 1],))
    return out


@pytest.mark.parametrize("fmt", ["jsonl", "json", "txt", "parquet"])
def test_formats_shapes_and_contents(tmp_path, fmt):
    cfg, data = load(write(tmp_path, fmt, [{"text": t} for t in TEXTS]), shuffle=False)
    assert cfg.builder == {"jsonl": "json", "json": "json", "txt": "text"}.get(fmt, fmt)
    train = TrainBatches(data.train, cfg)
    batches = [next(train) for _ in range(train.batches_per_epoch)]
    for batch in batches:
        assert set(batch) == {"tokens", "targets", "loss_mask", "segment_ids", "positions"}
        for k, v in batch.items():
            assert v.shape == (4, 32), k
            assert v.dtype == (np.float32 if k == "loss_mask" else np.int32), k
    assert train.batches_per_epoch == train.num_rows // 4
    # Every example comes back whole, once (the training epoch leaves the rows past the last
    # whole batch for another epoch; EvalBatches pads the last batch instead).
    expected = sorted(tuple(encoded(t)) for t in TEXTS)
    assert set(sequences(batches)) <= set(expected)
    assert sorted(sequences(EvalBatches(data.train, cfg))) == expected
    assert os.listdir(tmp_path) == [f"data.{fmt}"]  # nothing cached beside the data


def test_packing_invariants(tmp_path):
    cfg, data = load(write(tmp_path, "jsonl", [{"text": t} for t in TEXTS]), seq_len=24)
    train = TrainBatches(data.train, cfg)
    assert train.fill > 0.7
    for _ in range(train.batches_per_epoch):
        batch = next(train)
        pad = batch["segment_ids"] == 0
        assert (batch["loss_mask"][pad] == 0).all() and (batch["tokens"][pad] == 0).all()
        assert (batch["segment_ids"].max(axis=1) >= 1).all()
        for b, i, j in segments(batch):
            assert (batch["positions"][b, i:j] == np.arange(j - i)).all()
            assert (batch["targets"][b, i:j - 1] == batch["tokens"][b, i + 1:j]).all()
            assert (batch["loss_mask"][b, i:j] == 1).all()  # plain text: every target counts
        # At a boundary the target is the example's own last token, never the next one's BOS.
        ends = (batch["segment_ids"] != 0) & (np.roll(batch["segment_ids"], -1, 1)
                                              != batch["segment_ids"])
        ends[:, -1] = False  # a row-filling chunk may end mid-example
        assert (batch["targets"][ends] == EOS).all() and (batch["tokens"] != BOS)[ends].all()


def test_long_examples_are_chunked(tmp_path):
    text = "0123456789" * 5  # 52 tokens with BOS and EOS: 51 pairs, chunks of 16, 16, 16, 3
    cfg, data = load(write(tmp_path, "jsonl", [{"text": text}]), seq_len=16, batch_size=1,
                     shuffle=False)
    train = TrainBatches(data.train, cfg)
    assert train.batches_per_epoch == 4
    chunks = sequences(next(train) for _ in range(4))
    assert [len(c) for c in chunks] == [17, 17, 17, 4]
    joined = list(chunks[0]) + [t for c in chunks[1:] for t in c[1:]]  # chunks overlap by one
    assert joined == encoded(text)


def test_no_packing_truncates(tmp_path):
    cfg, data = load(write(tmp_path, "jsonl", [{"text": t} for t in TEXTS]), seq_len=10,
                     pack=False, shuffle=False)
    batch = next(TrainBatches(data.train, cfg))
    assert (batch["segment_ids"] == 1).all()  # every text has >= 10 pairs
    assert [list(s) for s in sequences([batch])] == [encoded(t)[:11] for t in TEXTS[:4]]


def test_prompt_response_mask(tmp_path):
    rows = [{"prompt": p, "response": r, "id": i} for i, (p, r) in enumerate(PAIRS)]
    cfg, data = load(write(tmp_path, "parquet", rows), seq_len=48, prompt_field="prompt",
                     response_field="response", shuffle=False)
    batch = next(TrainBatches(data.train, cfg))
    for (b, i, j), (p, r) in zip(segments(batch), PAIRS):
        n_prompt = 1 + len(TOK.encode(p, add_special_tokens=False))  # BOS + prompt
        mask = batch["loss_mask"][b, i:j]
        # Targets are tokens 1.. of the example: prompt tokens 1..n_prompt-1 get no loss.
        assert (mask[: n_prompt - 1] == 0).all() and (mask[n_prompt - 1:] == 1).all()
        assert TOK.decode(batch["targets"][b, i + n_prompt - 1:j - 1]) == r


def test_resume_equals_uninterrupted(tmp_path):
    cfg, data = load(write(tmp_path, "jsonl", [{"text": t} for t in TEXTS]), seq_len=30,
                     batch_size=3, validation_fraction=0.1)
    ref = TrainBatches(data.train, cfg)
    n, m = ref.batches_per_epoch + 2, ref.batches_per_epoch  # cross an epoch boundary both ways
    expected = [next(ref) for _ in range(n + m)]
    run = TrainBatches(data.train, cfg)
    for _ in range(n):
        next(run)
    saved = json.loads(json.dumps(run.state().to_dict()))
    assert saved == {"epoch": 1, "step": 2}
    resumed = TrainBatches(data.train, cfg, state=saved)
    for want in expected[n:]:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # Epochs are shuffled differently; each epoch holds every example at most once.
    e0, e1 = expected[: ref.batches_per_epoch], expected[ref.batches_per_epoch: 2 * n]
    assert sequences(e0) != sequences(e1)
    assert len(set(sequences(e0))) == len(sequences(e0))
    with pytest.raises(DataError, match="outside"):
        TrainBatches(data.train, cfg, state=DataState(epoch=0, step=ref.batches_per_epoch))


def test_validation_is_held_out(tmp_path):
    rows = [{"text": t, "doc": f"doc{i // 5}"} for i, t in enumerate(TEXTS)]
    path = write(tmp_path, "jsonl", rows)
    cfg, data = load(path, validation_fraction=0.3, pack=False, seq_len=64)
    assert 0 < len(data.validation) < len(TEXTS) and len(data.train) + len(data.validation) == 60
    train = TrainBatches(data.train, cfg)
    seen = sequences(next(train) for _ in range(3 * train.batches_per_epoch))
    val = EvalBatches(data.validation, cfg)
    held = sequences(val)
    assert held == sequences(val)  # re-iterable, deterministic
    assert set(seen) | set(held) == {tuple(encoded(t)) for t in TEXTS}
    assert not set(seen) & set(held)
    last = list(val)[-1]
    n_rows = len(data.validation) % 4 or 4
    assert len(val) == -(-len(data.validation) // 4)
    assert (last["loss_mask"][n_rows:] == 0).all() and (last["segment_ids"][n_rows:] == 0).all()
    # split_key: whole documents go to one side.
    _, by_doc = load(path, validation_fraction=0.3, split_key="doc")
    val_texts = [TOK.decode(by_doc.validation[i]) for i in range(len(by_doc.validation))]
    held = {int(t.split(":")[0].removeprefix("example ")) for t in val_texts}
    docs = {i // 5 for i in held}
    assert held and len(docs) < 12 and held == {i for i in range(60) if i // 5 in docs}


def test_tiny_data_pads_one_batch_and_empty_lines_skipped(tmp_path):
    path = os.path.join(tmp_path, "t.txt")
    with open(path, "w") as f:
        f.write("hello\n\nworld\n")
    cfg, data = load(path, batch_size=8, pack=False)
    assert len(data.train) == 2
    train = TrainBatches(data.train, cfg)
    assert train.batches_per_epoch == 1
    batch = next(train)
    assert batch["loss_mask"][2:].sum() == 0 and batch["loss_mask"][:2].sum() > 0


def test_batches_run_through_the_model_without_nans(tmp_path):
    cfg, data = load(write(tmp_path, "jsonl", [{"text": t} for t in TEXTS[:9]]), seq_len=40)
    batch = next(TrainBatches(data.train, cfg))
    assert (batch["segment_ids"] == 0).any() and (batch["segment_ids"].max(1) > 1).any()
    mcfg = lj.LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                          bos_token_id=BOS, eos_token_id=EOS)
    params = random_params(mcfg, 0, jnp.float32)
    logits = jit_forward()(params, jnp.asarray(batch["tokens"]), mcfg,
                           positions=jnp.asarray(batch["positions"]),
                           segment_ids=jnp.asarray(batch["segment_ids"]))
    assert np.isfinite(np.asarray(logits)).all()
    # Packing is exact: a segment's logits equal those of the example run alone.
    b, i, j = next(segments(batch))
    alone = jit_forward()(params, jnp.asarray(batch["tokens"][b:b + 1, i:j]), mcfg)
    np.testing.assert_allclose(logits[b, i:j], alone[0], atol=1e-5)


def test_folder_and_glob(tmp_path):
    write(tmp_path, "jsonl", [{"text": t} for t in TEXTS[:30]], name="a")
    write(tmp_path, "jsonl", [{"text": t} for t in TEXTS[30:]], name="b")
    for path in (str(tmp_path), os.path.join(tmp_path, "*.jsonl")):
        cfg, data = load(path)
        assert len(cfg.files) == 2 and len(data.train) == 60


def test_errors(tmp_path):
    path = write(tmp_path, "jsonl", [{"body": "x", "title": "y"}])
    with pytest.raises(DataError, match=r"field 'text'.*available columns: \['body', 'title'\]"):
        load(path)
    with pytest.raises(DataError, match="field 'answer'"):
        load(path, prompt_field="body", response_field="answer")
    with pytest.raises(DataError, match="no such file"):
        DataConfig(path=os.path.join(tmp_path, "missing.jsonl"), seq_len=8, batch_size=1)
    with pytest.raises(DataError, match="unknown format 'csv'"):
        DataConfig(path=path, format="csv", seq_len=8, batch_size=1)
    with pytest.raises(DataError, match="seq_len"):
        DataConfig(path=path, seq_len=1, batch_size=1)
    with pytest.raises(DataError, match="both prompt_field and response_field"):
        DataConfig(path=path, seq_len=8, batch_size=1, prompt_field="body")
    odd = os.path.join(tmp_path, "data.csv")
    open(odd, "w").close()
    with pytest.raises(DataError, match="cannot infer the format"):
        DataConfig(path=odd, seq_len=8, batch_size=1)
    with pytest.raises(DataError, match="no data files"):
        DataConfig(path=str(tmp_path), format="parquet", seq_len=8, batch_size=1)
    bad = os.path.join(tmp_path, "bad.jsonl")
    with open(bad, "w") as f:
        f.write('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match="cannot read"):
        load(bad)
    num = write(tmp_path, "jsonl", [{"text": 3}], name="num")
    with pytest.raises(DataError, match="must hold text"):
        load(num)
    with pytest.raises(DataError, match="bos_id is None"):
        load_data(DataConfig(path=path, seq_len=8, batch_size=1, text_field="body"), TOK,
                  bos_id=None, eos_id=EOS)
    cfg = DataConfig(path=path, seq_len=8, batch_size=1)
    assert hash(cfg) == hash(DataConfig(path=path, seq_len=8, batch_size=1))
