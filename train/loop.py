"""The training loop: model and data in, checkpoints, metrics and an exported adapter out.

``train(tc)`` resumes from the latest checkpoint in ``tc.out_dir`` when there is one (same config
required), so a killed run continues where it stopped: same next batch, same dropout keys, same
loss curve. Every step appends a line to ``metrics.jsonl`` (lines past a restored step are dropped
on resume); held-out loss is measured every ``eval_every`` steps; at the end the adapter is
exported (``adapter/``) and the routers' expert usage is plotted (``usage.png``).

Several devices: the batch is split over a ``data`` mesh axis; the frozen backbone is replicated,
or sharded over the same axis with ``fsdp`` (XLA gathers each weight where it is used).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from loraswitch_jax.adapter_io import save_adapter
from loraswitch_jax.adapters import check_adapter, init_adapter
from loraswitch_jax.config import PRESETS, LlamaConfig
from loraswitch_jax.params import LlamaParams, init_params
from loraswitch_jax.tokenizer import Tokenizer, byte_tokenizer
from loraswitch_jax.train.checkpoints import Checkpointer
from loraswitch_jax.train.config import TrainConfig
from loraswitch_jax.train.data import DataState, EvalBatches, TrainBatches, load_data
from loraswitch_jax.train.step import TrainState, eval_step, init_state, train_step
from loraswitch_jax.weights import load_params

__all__ = ["load_model", "make_mesh", "train", "evaluate"]

_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def load_model(tc: TrainConfig) -> tuple[LlamaParams, LlamaConfig, Tokenizer]:
    """A preset (random weights, byte tokenizer for ``demo``) or a Hugging Face folder."""
    dtype = _DTYPES[tc.dtype]
    if tc.model in PRESETS:
        cfg = PRESETS[tc.model]
        params = init_params(cfg, jax.random.key(tc.init_seed), dtype)
        return params, cfg, byte_tokenizer()
    if not os.path.isdir(tc.model):
        raise FileNotFoundError(
            f"model {tc.model!r} is neither a preset ({', '.join(PRESETS)}) nor a folder"
        )
    params, cfg = load_params(tc.model, dtype=dtype)
    return params, cfg, Tokenizer.from_pretrained(tc.model)


def make_mesh(tc: TrainConfig) -> Mesh:
    devices = jax.devices()
    n = tc.data_parallel or len(devices)
    if n > len(devices):
        raise ValueError(f"data_parallel={n} but only {len(devices)} devices are visible")
    if tc.data.batch_size % n:
        raise ValueError(f"batch_size {tc.data.batch_size} is not divisible by {n} data-parallel devices")
    return Mesh(np.array(devices[:n]), ("data",))


def _fsdp_spec(x: jax.Array, n: int) -> P:
    """Shard the largest axis that ``n`` divides; replicate small or indivisible leaves."""
    if x.size < 2**14:
        return P()
    axes = sorted(range(x.ndim), key=lambda i: -x.shape[i])
    for i in axes:
        if x.shape[i] % n == 0:
            return P(*([None] * i + ["data"]))
    return P()


def _place(tree, mesh: Mesh, spec_fn):
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec_fn(x))), tree)


def evaluate(adapter, params, batches: EvalBatches, cfg: LlamaConfig, limit: int, put) -> float | None:
    """Mean held-out token cross-entropy over at most ``limit`` batches (0: all)."""
    ce, tokens = 0.0, 0.0
    for i, batch in enumerate(batches):
        if limit and i >= limit:
            break
        out = eval_step(adapter, params, put(batch), cfg=cfg)
        ce, tokens = ce + float(out["ce_sum"]), tokens + float(out["tokens"])
    return ce / tokens if tokens else None


def _stack_micro(batches: TrainBatches, n: int) -> dict:
    micro = [next(batches) for _ in range(n)]
    return {k: np.stack([m[k] for m in micro]) for k in micro[0]}


def _truncate_metrics(path: str, step: int) -> None:
    """Drop lines logged after ``step`` (they belong to the part of a run that was lost)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(lines)
    os.replace(tmp, path)


def _usage_plot(usage: np.ndarray, mode: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    E = usage.shape[-1]
    if usage.shape[0] == 1:
        ax.bar(np.arange(E), usage[0])
    else:
        im = ax.imshow(usage, aspect="auto", cmap="viridis")
        fig.colorbar(im, ax=ax, label="fraction of assignments")
        ax.set_ylabel("adapted layer")
    ax.axhline(1 / E, color="k", lw=0.8, ls="--") if usage.shape[0] == 1 else None
    ax.set_xlabel("expert")
    ax.set_title(f"expert usage ({mode}); dashed: uniform")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def usage_text(usage: np.ndarray) -> str:
    """A one-line-per-router text histogram of expert usage ``[N, E]``."""
    lines = []
    for i, row in enumerate(usage):
        bars = " ".join(f"{u:5.1%}" for u in row)
        lines.append(f"  router {i}: {bars}")
    return "\n".join(lines)


def train(tc: TrainConfig, *, stop_after: int | None = None, progress: bool = True) -> dict:
    """Train (or resume) the adapter described by ``tc``; returns a summary dict.

    ``stop_after`` ends the run after that many optimizer steps (as a kill would; no final
    export), for testing resumption.
    """
    os.makedirs(tc.out_dir, exist_ok=True)
    params, cfg, tokenizer = load_model(tc)
    mesh = make_mesh(tc)
    n_dev = mesh.devices.size
    params = _place(params, mesh, (lambda x: _fsdp_spec(x, n_dev)) if tc.fsdp else (lambda x: P()))
    batch_sharding = NamedSharding(mesh, P(None, "data"))
    eval_sharding = NamedSharding(mesh, P("data"))

    def put_train(b):
        return {k: jax.device_put(v, batch_sharding) for k, v in b.items()}

    def put_eval(b):
        return {k: jax.device_put(v, eval_sharding) for k, v in b.items()}

    data = load_data(tc.data, tokenizer, bos_id=cfg.bos_token_id, eos_id=cfg.eos_token_id)
    if data.train.tokens.size and int(data.train.tokens.max()) >= cfg.vocab_size:
        raise ValueError(
            f"the tokenizer produced id {int(data.train.tokens.max())}, outside the model's "
            f"vocabulary ({cfg.vocab_size}): tokenizer and model do not belong together"
        )
    adapter = init_adapter(cfg, tc.adapter, jax.random.key(tc.init_seed + 1))
    state = _place(init_state(adapter, tc.optim, tc.init_seed), mesh, lambda x: P())

    ckpt = Checkpointer(os.path.join(tc.out_dir, "checkpoints"), tc.identity(), tc.save_every, tc.keep)
    metrics_path = os.path.join(tc.out_dir, "metrics.jsonl")
    data_state = None
    if ckpt.latest_step() is not None:
        state, saved_data_state, step = ckpt.restore(state)
        data_state = DataState(**saved_data_state)
        _truncate_metrics(metrics_path, step)
        print(f"resumed from step {step} ({ckpt.directory})")
    elif os.path.exists(metrics_path):
        os.remove(metrics_path)
    check_adapter(state.adapter, cfg)
    train_batches = TrainBatches(data.train, tc.data, state=data_state)
    eval_batches = EvalBatches(data.validation, tc.data)
    if not len(eval_batches):
        print("note: the held-out split is empty (data.validation_fraction); no eval_loss is logged")

    start = int(state.step)
    end = tc.optim.steps if stop_after is None else min(tc.optim.steps, start + stop_after)
    usage_sum, usage_n, last = None, 0, {}
    bar = tqdm(total=tc.optim.steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    with open(metrics_path, "a") as log:
        if start == 0:  # the starting point of the held-out curve
            initial = evaluate(state.adapter, params, eval_batches, cfg, tc.eval_batches, put_eval)
            log.write(json.dumps({"step": 0, "eval_loss": initial}) + "\n")
        for step in range(start, end):
            batch = put_train(_stack_micro(train_batches, tc.optim.grad_accum))
            state, metrics = train_step(state, params, batch, cfg=cfg, oc=tc.optim)
            m = jax.device_get(metrics)
            record = {"step": step + 1, **{k: float(v) for k, v in m.items() if k != "usage"}}
            if "usage" in m:
                record["usage"] = np.round(m["usage"], 4).tolist()
                usage_sum = m["usage"] if usage_sum is None else usage_sum + m["usage"]
                usage_n += 1
            if (step + 1) % tc.eval_every == 0 or step + 1 == tc.optim.steps:
                record["eval_loss"] = evaluate(state.adapter, params, eval_batches, cfg, tc.eval_batches, put_eval)
            log.write(json.dumps(record) + "\n")
            log.flush()
            # The data state after this step's batches: a resume continues with the next ones.
            ckpt.save(step + 1, state, train_batches.state().to_dict(), force=step + 1 == tc.optim.steps)
            last = record
            bar.update(1)
            if (step + 1) % tc.log_every == 0 or step + 1 == end:
                post = {"loss": f"{record['loss']:.3f}", "aux": f"{record['aux']:.3f}"}
                if record.get("eval_loss") is not None:
                    post["eval"] = f"{record['eval_loss']:.3f}"
                bar.set_postfix(post)
    bar.close()
    ckpt.close()
    summary = {"steps": end, "seconds": time.perf_counter() - t0, "last": last}
    if end < tc.optim.steps:
        return summary
    save_adapter(jax.device_get(state.adapter), os.path.join(tc.out_dir, "adapter"), cfg)
    if usage_sum is not None:
        usage = usage_sum / usage_n
        summary["usage"] = usage.tolist()
        _usage_plot(usage, tc.adapter.mode, os.path.join(tc.out_dir, "usage.png"))
        print("expert usage over the run (fraction of assignments):\n" + usage_text(usage))
    with open(os.path.join(tc.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
