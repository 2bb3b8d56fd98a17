"""The accuracy experiment: scoring vs a direct computation, intervals, budgets, a micro run."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shlex

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import loraswitch_jax as lj
from loraswitch_jax import cli
from loraswitch_jax.eval.accuracy import experiment, inputs, presets, scoring, statistics
from loraswitch_jax.samples import sample_path
from loraswitch_jax.tokenizer import byte_tokenizer
from loraswitch_jax.train.data import DataConfig, TrainBatches
from loraswitch_jax.train.step import OptimConfig

TINY = presets.byte_llama(32, 2, 2, 2, 64, 128)


@pytest.fixture(scope="module")
def model():
    """Tiny byte-level params with large enough weights that options score differently, and a
    switch adapter with nonzero B so that the routed path matters (numpy draws: no compiles)."""
    rng = np.random.default_rng(0)
    acfg = lj.AdapterConfig(mode="switch", num_experts=4, top_k=2, rank=2, router_layer=1)
    params, adapter = jax.eval_shape(lambda: (
        lj.init_params(TINY, jax.random.key(0), jnp.float32),
        lj.init_adapter(TINY, acfg, jax.random.key(1))))
    params, adapter = jax.tree.map(
        lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32), (params, adapter))
    return params, adapter


@functools.cache
def _forward():
    return jax.jit(lj.forward, static_argnames=("cfg",))


def _direct_logprob(params, adapter, tokens, first_target):
    """log p(tokens[first_target:] | tokens[:first_target]) from one unpadded forward."""
    logits = _forward()(params, jnp.asarray(tokens)[None], TINY, adapter=adapter)[0]
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
    return float(sum(logp[t - 1, tokens[t]] for t in range(first_target, len(tokens))))


@pytest.mark.parametrize("use_adapter", [False, True])
def test_option_logprob_matches_forward(model, use_adapter):
    params, adapter = model
    adapter = adapter if use_adapter else None
    # Two sequence lengths (fewer compiles of the direct forward); batches of 3 mix them, so
    # padding and regrouping must not change any score.
    items = [{"context": "apparition (n.):", "options": ["a ghost", "a chair", "x", "a table"],
              "answer": 0},
             {"context": "Q: Why? A:",
              "options": ["because", "nothing", "it is so good", "no idea"], "answer": 2}]
    seqs, num_bytes, truncated = scoring.choice_sequences(items, inputs.encode_bytes,
                                                          presets.BOS, max_len=64)
    scores = scoring.score_sequences(params, TINY, seqs, adapter=adapter, batch_size=3, max_len=64)
    cs = scoring.choice_scores(scores, num_bytes, items, truncated)
    for i, item in enumerate(items):
        context = [presets.BOS, *item["context"].encode()]
        for j, option in enumerate(item["options"]):
            tokens = np.array(context + list((" " + option).encode()), np.int32)
            want = _direct_logprob(params, adapter, tokens, len(context))
            assert cs.logprob[i, j] == pytest.approx(want, rel=1e-5, abs=1e-4)
            assert num_bytes[i, j] == len(option.encode())  # the option's bytes, not the space
    assert truncated == 0
    norm = cs.logprob / cs.num_bytes
    np.testing.assert_array_equal(cs.correct_norm, np.argmax(norm, 1) == cs.answer)
    np.testing.assert_array_equal(cs.correct_sum, np.argmax(cs.logprob, 1) == cs.answer)


def test_per_byte_normalisation_can_flip_the_choice():
    # A long option with a higher total but a lower per-byte log-probability.
    scores = scoring.Scores(logprob=np.array([-10.0, -3.0, -20.0, -30.0]), count=np.ones(4),
                            usage=None)
    num_bytes = np.array([[20.0, 2.0, 10.0, 10.0]])
    cs = scoring.choice_scores(scores, num_bytes, [{"answer": 0}])
    assert cs.correct_sum.tolist() == [0.0]  # option 1 has the highest sum
    assert cs.correct_norm.tolist() == [1.0]  # option 0: -0.5 per byte beats -1.5


def test_long_context_keeps_bos_newest_bytes_and_whole_option():
    item = {"context": "abcdefghij" * 10, "options": ["xyz", "u", "vv", "w"], "answer": 0}
    seqs, num_bytes, truncated = scoring.choice_sequences([item], inputs.encode_bytes,
                                                          presets.BOS, max_len=16)
    assert truncated == 1
    first = seqs[0]
    assert first.tokens.size == 16 and first.tokens[0] == presets.BOS
    assert bytes(first.tokens[-4:].tolist()) == b" xyz"
    assert bytes(first.tokens[1:-4].tolist()) == item["context"].encode()[-11:]
    assert first.targets.sum() == 4 and num_bytes[0, 0] == 3  # " xyz" scored, "xyz" normalises


def test_heldout_windows_cover_every_byte_once(model):
    params, _ = model
    texts = [inputs.encode_bytes("x" * n) for n in (1, 30, 31, 95)] + [np.zeros(0, np.int32)]
    windows, owner = scoring.heldout_sequences(texts, presets.BOS, max_len=32)
    assert all(w.tokens.size <= 32 for w in windows)
    scores = scoring.score_sequences(params, TINY, windows, max_len=32)
    size = np.bincount(owner, weights=scores.count, minlength=len(texts))
    np.testing.assert_array_equal(size, [1, 30, 31, 95, 0])
    # A text that fits one window scores like the direct computation.
    tokens = np.concatenate([[presets.BOS], texts[1]]).astype(np.int32)
    assert scores.logprob[owner == 1].sum() == pytest.approx(
        _direct_logprob(params, None, tokens, 1), rel=1e-5)


def test_spread_windows_cover_texts_before_repeating_one():
    owner = np.array([0] * 10 + [1] * 2 + [2])  # a long text and two short ones
    size = np.full(owner.size, 100)
    keep = inputs.spread_windows(owner, size, budget=300, seed=0, name="t")
    assert sorted(owner[keep].tolist()) == [0, 1, 2]  # one window of each text first
    keep = inputs.spread_windows(owner, size, budget=550, seed=0, name="t")
    assert sorted(owner[keep].tolist()) == [0, 0, 0, 1, 1, 2]  # second windows, then a third
    assert len(set(keep.tolist())) == len(keep)


def test_encode_bytes_is_the_byte_tokenizer():
    text = "naïve café — def f(x):\n\treturn x"
    assert inputs.encode_bytes(text).tolist() == byte_tokenizer().encode(
        text, add_special_tokens=False)


def test_wilson_interval():
    lo, hi = scoring.wilson_interval(50, 100)
    assert lo < 0.5 < hi and hi - 0.5 == pytest.approx(0.5 - lo)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-4)  # textbook value
    assert scoring.wilson_interval(0, 20)[0] == 0.0 and scoring.wilson_interval(20, 20)[1] == 1.0
    wide, narrow = scoring.wilson_interval(30, 100), scoring.wilson_interval(300, 1000)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


def test_bootstrap_intervals():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 1.0, 400)
    lo, hi = scoring.bootstrap(lambda a: a.mean(-1), x, resamples=2000)
    assert lo < x.mean() < hi and hi - lo == pytest.approx(2 * 1.96 / 20, rel=0.2)
    # Paired: the same rows for both columns, so a constant shift has a zero-width interval.
    assert scoring.bootstrap(lambda a, b: a.mean(-1) - b.mean(-1), x + 0.3, x) == \
        pytest.approx((0.3, 0.3))
    # Strata keep their rows in place: a per-stratum statistic sees only its stratum's values.
    strata = np.repeat([0, 1], 200)
    y = np.where(strata == 0, 5.0, -5.0)
    lo, hi = scoring.bootstrap(lambda a: a[..., strata == 0].mean(-1), y, strata=strata)
    assert lo == hi == 5.0


def _loss_diff(nll_a, nll_b, size):  # a ratio of sums, as the held-out statistics are
    return (nll_a.sum(-1) - nll_b.sum(-1)) / size.sum(-1)


@pytest.mark.parametrize("two_strata", [False, True])
def test_cluster_bootstrap_with_one_row_per_group_is_the_row_bootstrap(two_strata):
    rng = np.random.default_rng(1)
    nll_a, nll_b = rng.normal(2.0, 0.5, (2, 60))
    size = rng.integers(50, 200, 60).astype(np.float64)
    strata = np.repeat([0, 1], 30) if two_strata else None
    rows = scoring.bootstrap(_loss_diff, nll_a, nll_b, size, resamples=500, strata=strata)
    groups = scoring.bootstrap(_loss_diff, nll_a, nll_b, size, resamples=500, strata=strata,
                               groups=np.arange(60))
    assert groups == pytest.approx(rows, rel=1e-12)


def test_cluster_bootstrap_widens_for_correlated_rows():
    # 30 texts of 20 windows each; a window's loss is mostly its text's (shared) effect.
    rng = np.random.default_rng(2)
    text = np.repeat(np.arange(30), 20)
    effect = rng.normal(0.0, 1.0, 30)[text] + rng.normal(0.0, 0.1, text.size)
    ones = np.ones(text.size)

    def mean(x, count):
        return x.sum(-1) / count.sum(-1)

    lo, hi = scoring.bootstrap(mean, effect, ones, resamples=1000)
    glo, ghi = scoring.bootstrap(mean, effect, ones, resamples=1000, groups=text)
    assert ghi - glo > 3 * (hi - lo)  # ~sqrt(20) = 4.5x wider: 30 independent texts, not 600
    assert glo < effect.mean() < ghi
    # Equal-sized texts: drawing texts is the row bootstrap of the 30 text means.
    text_means = effect.reshape(30, 20).mean(1)
    assert (glo, ghi) == pytest.approx(
        scoring.bootstrap(mean, text_means, np.ones(30), resamples=1000), rel=1e-12)


def test_cluster_bootstrap_checks_its_groups():
    x = np.arange(6.0)
    with pytest.raises(ValueError, match="groups must have one label per row"):
        scoring.bootstrap(lambda a: a.sum(-1), x, groups=np.arange(5))
    with pytest.raises(ValueError, match="span more than one stratum"):
        scoring.bootstrap(lambda a: a.sum(-1), x, strata=[0, 0, 0, 1, 1, 1],
                          groups=[0, 0, 1, 1, 2, 2])


def test_compare_draws_heldout_texts():
    # Two domains of 10 texts x 8 windows; A's advantage over B varies by text only.
    rng = np.random.default_rng(3)
    domain, text = np.repeat([0, 1], 80), np.repeat(np.arange(20), 8)
    size = np.full(160, 100.0)
    nll_b = rng.normal(200.0, 5.0, 160)
    nll_a = nll_b + 100.0 * rng.normal(-0.02, 0.02, 20)[text]
    a, b = {"nll": nll_a, "size": size, "tasks": {}}, {"nll": nll_b, "size": size, "tasks": {}}

    def widths(window_text):
        data = inputs.EvalSet([], domain, window_text, [], {}, {}, {}, {}, {})
        out = statistics.compare(a, b, data, ("x", "y"), resamples=500, seed=0)
        cells = [out["heldout_mean"], *out["heldout_by_domain"].values()]
        return np.array([c["ci"][1] - c["ci"][0] for c in cells])

    assert np.all(widths(text) > 2 * widths(np.arange(160)))


def test_task_strata_join_tasks_that_share_units():
    units = [np.array(["s1", "s2"]), np.array(["s3"]), np.array(["s2", "s4", "s4"]),
             np.array(["f1"])]
    # The first and third tasks share s2; each other task is its own stratum.
    assert statistics.task_strata(units).tolist() == [0, 0, 1, 0, 0, 0, 3]


def _choices(right: np.ndarray) -> scoring.ChoiceScores:
    """Four-option scores that pick the answer (option 0) where ``right``, option 1 elsewhere."""
    logprob = np.zeros((right.size, 4))
    logprob[np.arange(right.size), np.where(right, 0, 1)] = 1.0
    return scoring.ChoiceScores(logprob, np.ones((right.size, 4)), np.zeros(right.size, int), 0)


def test_compare_draws_task_units():
    # Three tasks of 20 units x 6 items. A is right and B wrong on some units, the reverse on
    # the others (with a little item-level noise), so the items of one unit agree. The first
    # two tasks are cut from the same units, as definition and definition_hard are.
    rng = np.random.default_rng(4)
    unit = np.repeat(np.arange(20), 6)
    a_wins = rng.random(20) < 0.5
    names = ("definition", "definition_hard", "next_sentence")
    a_right = {t: a_wins[unit] ^ (rng.random(unit.size) < 0.1) for t in names}
    held = {"nll": np.ones(4), "size": np.ones(4)}
    a = {**held, "tasks": {t: _choices(a_right[t]) for t in names}}
    b = {**held, "tasks": {t: _choices(~a_right[t]) for t in names}}

    def widths(item_unit):
        data = inputs.EvalSet([], np.zeros(4, int), np.arange(4), [], {}, {}, {}, item_unit,
                                {})
        out = statistics.compare(a, b, data, ("x",), resamples=500, seed=0)
        assert out["acc_norm_by_task"]["definition"]["diff"] == pytest.approx(
            2 * a_right["definition"].mean() - 1)
        cells = [out["tasks_mean_acc_norm"], *out["acc_norm_by_task"].values()]
        return np.array([c["ci"][1] - c["ci"][0] for c in cells])

    shared = np.array([f"dictionary:{u}" for u in unit])
    by_unit = widths({"definition": shared, "definition_hard": shared,
                      "next_sentence": np.array([f"literature:{u}" for u in unit])})
    by_item = widths({t: np.array([f"{t}:{i}" for i in range(unit.size)]) for t in names})
    assert np.all(by_unit > 1.5 * by_item)  # ~sqrt(6) wider: 20 units per task, not 120 items


def _budget_preset(**kw):
    one_step = OptimConfig(steps=1, warmup_steps=0)
    base = dict(name="t", model=TINY, seq_len=64, batch_size=4, pretrain=one_step,
                finetune=one_step, num_experts=8, expert_rank=4)
    return presets.Preset(**{**base, **kw})


def test_equal_budgets():
    preset = _budget_preset()
    V = presets.Variant
    counts = {}
    for v in (V(name="lora", mode="lora"), V(name="layerwise", mode="layerwise"),
              V(name="switch", mode="switch"), V(name="e32", mode="switch", num_experts=32),
              V(name="k1", mode="switch", top_k=1),
              V(name="half", mode="switch", router_layer=1)):
        acfg, exact = presets.adapter_config(preset, v)
        counts[v.name] = (acfg, exact, presets.count_params(TINY, acfg))
    lora, layerwise, switch = (counts[k][0] for k in ("lora", "layerwise", "switch"))
    assert (lora.rank, layerwise.rank, switch.rank) == (32, 4, 4)
    assert lora.scale == layerwise.scale == switch.scale == preset.lora_scale
    experts = {k: c[2]["experts"] for k, c in counts.items()}
    assert len(set(experts.values())) == 1, experts  # all equal: exact budgets
    assert all(c[1] for c in counts.values())
    assert counts["e32"][0].rank == 1 and counts["half"][0].rank == 8
    d, L = TINY.hidden_size, TINY.num_hidden_layers
    assert counts["switch"][2]["routers"] == d * 8
    assert counts["layerwise"][2]["routers"] == L * d * 8
    assert counts["lora"][2]["routers"] == 0
    # Every leaf of the adapter counted (not only A, B and the router) agrees; shapes only: an
    # eager init_adapter costs seconds of op-by-op compiles and has the same shapes.
    whole = jax.eval_shape(lambda: lj.init_adapter(TINY, switch, jax.random.key(0)))
    assert whole.num_params() == counts["switch"][2]["total"]
    # A budget that cannot be split evenly rounds the rank up and says so.
    acfg, exact = presets.adapter_config(preset, V(name="e128", mode="switch", num_experts=128))
    assert acfg.rank == 1 and not exact


DOMAIN_TEXT = {
    "code": lambda i: f"def f{i}(x):\n    return x * {i} + len('{i}')\n",
    "dictionary": lambda i: f"word{i} (n.): a thing numbered {i}; \"see word{i}\"",
    "literature": lambda i: f"It was the {i}th day. Emma walked to the house. She was glad.",
}


def _tiny_corpus(root):
    """A corpus folder in eval/accuracy/corpus.py's layout with three tasks of eight items."""
    os.makedirs(os.path.join(root, "tasks"))
    for domain, make in DOMAIN_TEXT.items():
        for split, ids in (("train", range(60)), ("heldout", range(100, 106))):
            with open(os.path.join(root, f"{domain}.{split}.jsonl"), "w") as f:
                for i in ids:
                    f.write(json.dumps({"domain": domain, "key": str(i), "text": make(i)}) + "\n")
    for task in ("definition", "next_sentence", "qa"):
        with open(os.path.join(root, "tasks", f"{task}.jsonl"), "w") as f:
            for i in range(8):
                options = [f"a thing numbered {i}", f"a thing numbered {i + 1}", "ok",
                           f"zzz {i}"]
                f.write(json.dumps({"task": task, "id": f"{task}/{i}", "unit": f"u{i // 2}",
                                    "context": f"word{i} (n.):", "options": options,
                                    "answer": i % 4}) + "\n")
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump({"created": "test", "builder": "test"}, f)


def test_micro_experiment_writes_report(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    _tiny_corpus(str(corpus))
    preset = presets.Preset(
        name="micro", model=TINY, seq_len=32, batch_size=4,
        pretrain=OptimConfig(lr=3e-3, warmup_steps=1, steps=4),
        finetune=OptimConfig(lr=3e-3, warmup_steps=1, steps=3), num_experts=4, expert_rank=2,
        heldout_bytes=300, items_per_task=6, eval_batch_size=8, generate_tokens=2,
        bootstrap_resamples=50,
        ablations=(presets.Variant(name="switch router_layer=1", mode="switch", router_layer=1),))
    out = tmp_path / "out"
    report = experiment.run(str(corpus), preset, str(out), seed=0, progress=False,
                            save_models=True)
    for name in ("report.json", "report.md", "scores.npz", "heldout.png", "tasks.png",
                 "curves.png", "routing.png", "ablations.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "report.json").read_text())
    assert saved["statement"] == report["statement"] and "claim" in saved["statement"]
    assert set(saved["methods"]) == {"backbone", "lora", "layerwise", "switch",
                                     "switch router_layer=1"}
    assert list(saved["data"]["domains"]) == ["code", "dictionary", "literature"]
    for method in saved["methods"].values():
        h = method["heldout_nats_per_byte"]
        assert 0 < h["mean"] < 8 and set(h) == {"code", "dictionary", "literature", "mean"}
        for task in ("definition", "next_sentence", "qa"):
            r = method["tasks"][task]
            assert r["items"] == 6 and r["ci_norm"][0] <= r["acc_norm"] <= r["ci_norm"][1]
    assert saved["data"]["tasks"]["qa"]["baselines"]["items"] == 6
    assert len(saved["data"]["files"]) == 9  # 6 text files + 3 task files, hashed
    assert saved["data"]["heldout_scored"]["code"]["texts"] == 6
    assert saved["methods"]["switch"]["params"]["experts"] == \
        saved["methods"]["lora"]["params"]["experts"]
    assert "switch vs layerwise" in saved["comparisons"]
    assert "| switch |" in (out / "report.md").read_text()
    assert "switch router_layer=1: adapters cover the layers from the router's on" in \
        (out / "report.md").read_text()  # the ablation's confound, said where it is shown
    assert "resample whole held-out texts" in (out / "report.md").read_text()
    assert "resampling held-out texts" in saved["statement"]
    assert "resample whole source units" in (out / "report.md").read_text()
    assert "resampling source units" in saved["statement"]
    assert saved["bootstrap_units"] == {"heldout": "text", "tasks": "unit"}
    assert {who: set(g) for who, g in saved["generations"].items()} == \
        {who: set(experiment.PROMPTS) for who in ("backbone", "switch")}
    assert saved["data"]["tasks"]["qa"]["baselines"]["stem"] is not None  # headword contexts
    # Every window's domain and text are saved, so the intervals can be recomputed.
    scores = np.load(out / "scores.npz")
    units = scores["task_unit/qa"]  # each item's source unit, in item order
    assert units.shape == (6,) and set(units) <= {f"u{i}" for i in range(4)}
    assert saved["data"]["tasks"]["qa"]["units"] == len(set(units))
    domain, text = scores["heldout_domain"], scores["heldout_text"]
    assert domain.shape == text.shape == scores["switch/heldout_nll"].shape
    for i, name in enumerate(saved["data"]["domains"]):
        texts = np.unique(text[domain == i])
        assert texts.size == saved["data"]["heldout_scored"][name]["texts"]
        assert not np.isin(texts, text[domain != i]).any()  # text numbers differ across domains
    # The kept backbone and adapters generate from the command line, as ``demo`` prints it.
    for name in ("lora", "layerwise", "switch", "switch router_layer=1"):
        assert (pathlib.Path(experiment.adapter_dir(str(out), name)) / "adapter.safetensors").is_file()
    argv = shlex.split(experiment.generate_command(str(out)))
    assert argv[:2] == ["loraswitch", "generate"]
    assert cli.main([*argv[1:], "--max-new-tokens", "3", "--no-stream"]) == 0
    printed = capsys.readouterr().out
    assert f"adapter: {experiment.adapter_dir(str(out), 'switch')}  (switch," in printed
    assert "--- [0] def " in printed


def test_demo_preset_fits_the_bundled_sample():
    """``loraswitch demo`` (the README's main job) must not stop at the fresh-text check: its
    pretraining plus fine-tuning steps fit one pass over the bundled sample."""
    p = presets.PRESETS["demo"]
    corpus = inputs.load_corpus(sample_path("mixture"), p, 0)
    dcfg = DataConfig(path=sample_path("mixture"), format="jsonl", seq_len=p.seq_len,
                      batch_size=p.batch_size, seed=0)
    batches = TrainBatches(inputs.mixture_examples(corpus), dcfg).batches_per_epoch
    experiment.check_fresh_text(p, batches)
    with pytest.raises(ValueError, match="fine-tuning would reuse text"):
        experiment.check_fresh_text(p, p.pretrain.steps + p.finetune.steps - 1)
