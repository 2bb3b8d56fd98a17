"""The training loop: model and data in, checkpoints, metrics and an exported adapter out.

``train(tc)`` resumes from the latest checkpoint in ``tc.out_dir`` when there is one (same config
required), so a killed run continues where it stopped: same next batch, same dropout keys, same
loss curve. Every step appends a line to ``metrics.jsonl`` (lines past a restored step are dropped
on resume); held-out loss is measured every ``eval_every`` steps; at the end the adapter is
exported (``adapter/``) and the routers' expert usage is plotted (``usage.png``).

Nothing good is lost: a non-finite loss, gradient norm, held-out loss or state stops the run with
:class:`TrainingDiverged` before anything is saved (so no checkpoint is rotated out); a damaged
checkpoint is refused on restore (``CheckpointError`` names the step folder to delete); a finished
run (``summary.json`` and ``adapter/`` present) is left alone; Ctrl-C raises
:class:`TrainingInterrupted` naming the checkpoint a rerun resumes from.

Several devices: one mesh of axes ``data``, ``fsdp``, ``tensor`` (``tc.mesh``; ``train.placement``):
the batch's rows over ``data`` and ``fsdp``, the frozen backbone, adapter and optimizer state split
over ``fsdp`` and ``tensor``; the step is jitted with those shardings and XLA's SPMD partitioner
gathers each layer's weights where they are used.

Several processes (hosts): :func:`train` first joins the run the environment describes
(``loraswitch_jax.distributed.initialize``; a CLI calls it with its flags before), then every
process runs this same loop on one global mesh. Each reads only its devices' blocks of the HF
weights (``load_params(shardings=...)``) and builds only its devices' rows of each batch
(``train.hosts``); orbax writes each process' shards of a checkpoint. Process 0 alone writes the
metrics, summary, plot and exported adapter. ``out_dir`` must be one shared folder.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from loraswitch_jax.adapter_io import save_adapter
from loraswitch_jax.adapters import check_adapter, init_adapter
from loraswitch_jax.config import PRESETS, LlamaConfig
from loraswitch_jax.distributed import initialize
from loraswitch_jax.params import LlamaParams, init_params
from loraswitch_jax.tokenizer import Tokenizer, byte_tokenizer
from loraswitch_jax.train.checkpoints import (
    Checkpointer, CheckpointError, NonFiniteStateError, identity_diff, nonfinite_leaves,
)
from loraswitch_jax.train.config import ConfigFileError, TrainConfig
from loraswitch_jax.train.data import DataState, EvalBatches, TrainBatches, load_data
from loraswitch_jax.train.hosts import local_rows, to_global
from loraswitch_jax.train.placement import Placement, plan_placement
from loraswitch_jax.train.step import TrainState, eval_step, init_state
from loraswitch_jax.weights import load_params

__all__ = ["TrainingDiverged", "TrainingInterrupted", "abstract_params", "evaluate",
           "finished_summary", "load_model", "load_weights", "make_placement", "model_config",
           "train"]

_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


class TrainingDiverged(RuntimeError):
    """A loss, gradient norm or the state became NaN or infinite; nothing was saved after it.

    Attributes:
      step: the optimizer step (1-based, as in ``metrics.jsonl``) whose values were not finite.
    """

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message names the checkpoint a rerun resumes from."""


def check_positions(tc: TrainConfig, cfg: LlamaConfig) -> None:
    """Refuse rows longer than the model's positions (generation refuses them too)."""
    if tc.data.seq_len > cfg.max_position_embeddings:
        raise ConfigFileError(
            f"data.seq_len {tc.data.seq_len} is more than the model's max_position_embeddings "
            f"({cfg.max_position_embeddings}, {tc.model}): positions past it are never trained; "
            f"set data.seq_len <= {cfg.max_position_embeddings}"
        )


def model_config(tc: TrainConfig) -> tuple[LlamaConfig, Tokenizer]:
    """The config and tokenizer of a preset (byte tokenizer) or a Hugging Face folder; the
    weights are not read."""
    if tc.model in PRESETS:
        cfg = PRESETS[tc.model]
        check_positions(tc, cfg)
        return cfg, byte_tokenizer()
    if not os.path.isdir(tc.model):
        raise FileNotFoundError(
            f"model {tc.model!r} is neither a preset ({', '.join(PRESETS)}) nor a folder"
        )
    cfg = LlamaConfig.from_pretrained(tc.model)
    check_positions(tc, cfg)  # before reading the weights (gigabytes)
    return cfg, Tokenizer.from_pretrained(tc.model)


def load_weights(tc: TrainConfig, cfg: LlamaConfig, shardings: LlamaParams | None = None
                 ) -> LlamaParams:
    """The weights of ``tc.model`` (``cfg`` from :func:`model_config`): a preset's random ones or
    a Hugging Face folder's. ``shardings`` (a :class:`LlamaParams` of shardings) places them as
    they are made; a folder's are then read block by block, each process reading only its
    devices' blocks."""
    dtype = _DTYPES[tc.dtype]
    if tc.model in PRESETS:
        params = init_params(cfg, jax.random.key(tc.init_seed), dtype)
        return params if shardings is None else jax.device_put(params, shardings)
    return load_params(tc.model, cfg, dtype=dtype, shardings=shardings)[0]


def load_model(tc: TrainConfig) -> tuple[LlamaParams, LlamaConfig, Tokenizer]:
    """A preset (random weights, byte tokenizer for ``demo``) or a Hugging Face folder."""
    cfg, tokenizer = model_config(tc)
    return load_weights(tc, cfg), cfg, tokenizer


def abstract_params(cfg: LlamaConfig, dtype) -> LlamaParams:
    """Shapes and dtypes of ``cfg``'s weights (nothing allocated)."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), dtype))


def train_step(state: TrainState, params: LlamaParams, batch: dict, *, placement: Placement,
               **kwargs) -> tuple[TrainState, dict]:
    """``train.step.train_step`` as jitted for ``placement``'s mesh (``kwargs``: its static
    arguments). The loop's one call of the step, also a seam for tests."""
    return placement.train_step(state, params, batch, **kwargs)


def make_placement(tc: TrainConfig, cfg: LlamaConfig, params: LlamaParams, state: TrainState
                   ) -> Placement:
    """The shardings of the run's mesh (``tc.mesh``, or the ``data_parallel``/``fsdp`` default)."""
    if tc.data_parallel > jax.device_count():
        raise ValueError(f"data_parallel={tc.data_parallel} but only {jax.device_count()} devices "
                         "are visible")
    return plan_placement(tc.mesh_config(jax.device_count()), cfg, params, state,
                          tc.data.batch_size)


def evaluate(adapter, params, batches: EvalBatches, cfg: LlamaConfig, limit: int, put, *,
             attention_chunk: int | None = 512, step_fn=eval_step, attention_impl: str = "xla",
             loss_chunk: int | None = None) -> float | None:
    """Mean held-out token cross-entropy over at most ``limit`` batches (0: all); ``step_fn`` is
    the eval step (a placement's binds its mesh, so layers gather their weights over ``fsdp``).
    With ``attention_impl`` ``"cudnn"`` the batches' ``segment_ids`` are dropped
    (:func:`_attention_rows`)."""
    ce, tokens = 0.0, 0.0
    for i, batch in enumerate(batches):
        if limit and i >= limit:
            break
        out = step_fn(adapter, params, put(_attention_rows(batch, attention_impl)), cfg=cfg,
                      attention_chunk=attention_chunk, attention_impl=attention_impl,
                      loss_chunk=loss_chunk)
        ce, tokens = ce + float(out["ce_sum"]), tokens + float(out["tokens"])
    return ce / tokens if tokens else None


def _attention_rows(batch: dict, attention_impl: str) -> dict:
    """``batch`` as the step's attention takes it: without ``segment_ids`` for ``cudnn``, which
    ``TrainConfig`` allows only for unpacked rows, where they mark nothing but trailing padding
    (a causal row's real tokens never see it; its loss is masked)."""
    if attention_impl != "cudnn":
        return batch
    return {k: v for k, v in batch.items() if k != "segment_ids"}


def _host(tree):
    """``tree`` as numpy on this host (gathered from every process when it spans several)."""
    if all(x.is_fully_addressable for x in jax.tree.leaves(tree)):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def _stack_micro(batches: TrainBatches, n: int) -> dict:
    micro = [next(batches) for _ in range(n)]
    return {k: np.stack([m[k] for m in micro]) for k in micro[0]}


def _read_metrics(path: str) -> list[dict]:
    """The records of ``metrics.jsonl``; a torn last line (a kill mid-write) is dropped, with a note.

    Raises:
      ValueError: a line before the last is not JSON (the message names the file and line).
    """
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i + 1 < len(lines):
                raise ValueError(f"{path} line {i + 1} is not JSON ({e}); fix or delete the file "
                                 "(it only holds the logged metrics)") from e
            print(f"note: dropped the torn last line of {path} (a run killed while writing it)",
                  file=sys.stderr)
    return records


def _truncate_metrics(path: str, step: int) -> None:
    """Drop lines logged after ``step`` (they belong to the part of a run that was lost)."""
    if not os.path.exists(path):
        return
    lines = [json.dumps(r) + "\n" for r in _read_metrics(path) if r["step"] <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(lines)
    os.replace(tmp, path)


def _usage_plot(usage: np.ndarray, mode: str, path: str) -> None:
    """Expert usage [layers or 1, E]: bars for one router, a heat map for one per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    E = usage.shape[-1]
    if usage.shape[0] == 1:
        ax.bar(np.arange(E), usage[0])
        ax.axhline(1 / E, color="k", lw=0.8, ls="--")
        ax.set_ylabel("fraction of assignments")
        ax.set_title(f"expert usage ({mode}); dashed: uniform")
    else:
        im = ax.imshow(usage, aspect="auto", cmap="viridis", vmin=0)
        fig.colorbar(im, ax=ax, label=f"fraction of assignments (uniform {1 / E:.2f})")
        ax.set_yticks(np.arange(usage.shape[0]))
        ax.set_ylabel("adapted layer")
        ax.set_title(f"expert usage ({mode})")
    ax.set_xticks(np.arange(E))  # experts are whole numbers
    ax.set_xlabel("expert")
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


def finished_summary(tc: TrainConfig) -> dict | None:
    """The summary of the finished run in ``tc.out_dir`` (None when it has not finished).

    Finished: ``summary.json`` records ``tc.optim.steps`` steps and ``adapter/`` exists. The
    config must match (checked against the summary and the latest checkpoint).

    Raises:
      CheckpointError: the folder holds a run of another config.
    """
    path = os.path.join(tc.out_dir, "summary.json")
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError):  # absent, or torn by a kill: not finished (export again)
        return None
    if not isinstance(summary, dict) or summary.get("steps") != tc.optim.steps:
        return None
    if not os.path.isdir(os.path.join(tc.out_dir, "adapter")):
        return None
    diff = identity_diff(summary.get("identity", {}), json.loads(json.dumps(tc.identity())))
    if "identity" in summary and diff:
        raise CheckpointError(
            f"{tc.out_dir} holds a finished run of another config ({path}):\n  " + "\n  ".join(diff)
            + "\nuse another output folder, or the same config"
        )
    return summary


def _summarize(records: list[dict], end: int) -> tuple[dict, np.ndarray | None]:
    """The record of step ``end`` and the mean expert usage over the logged steps ``<= end``."""
    last = next((r for r in reversed(records) if r["step"] == end and "loss" in r), {})
    usage = [np.asarray(r["usage"]) for r in records if "usage" in r and r["step"] <= end]
    return last, (np.mean(usage, axis=0) if usage else None)


def _check_finite(step: int, record: dict, ckpt: Checkpointer) -> None:
    bad = {k: record.get(k) for k in ("loss", "aux", "grad_norm", "eval_loss")
           if record.get(k) is not None and not np.isfinite(record[k])}
    if bad:
        raise _diverged(step, ", ".join(f"{k} {v}" for k, v in bad.items()), ckpt)


def _diverged(step: int, what: str, ckpt: Checkpointer) -> TrainingDiverged:
    latest = ckpt.latest_step()
    kept = (f"the last checkpoint (step {latest}, {ckpt.step_dir(latest)}) is untouched"
            if latest is not None else "no checkpoint was written")
    return TrainingDiverged(
        f"training diverged at step {step}: {what}; nothing saved after it, {kept}; lower "
        "optim.lr (or lower optim.clip_norm) and train into a new "
        "out_dir (a changed config does not resume these checkpoints)",
        step,
    )


def _interrupted(step: int | None, ckpt: Checkpointer, tc: TrainConfig) -> TrainingInterrupted:
    ckpt.reload()  # what is on disk is what a rerun restores
    latest = ckpt.latest_step()
    if latest is None:
        then = f"no checkpoint yet (save_every={tc.save_every}): a rerun starts over"
    else:
        then = f"a rerun with the same config resumes from step {latest} ({ckpt.step_dir(latest)})"
    return TrainingInterrupted(f"interrupted{'' if step is None else f' at step {step}'}; {then}")


def train(tc: TrainConfig, *, stop_after: int | None = None, progress: bool = True) -> dict:
    """Train (or resume) the adapter described by ``tc``; returns a summary dict.

    ``stop_after`` ends the run after that many optimizer steps (as a kill would; no final
    export), for testing resumption. A finished run is not touched: its stored summary is
    returned (with ``already_finished: True``).

    Raises:
      TrainingDiverged: a non-finite loss, gradient norm, held-out loss or state; the checkpoints
        from before it are kept.
      TrainingInterrupted: Ctrl-C (a ``KeyboardInterrupt``); the message says where a rerun
        resumes.
      CheckpointError: the output folder's checkpoint is of another config or damaged (the
        message names the step folder to delete).
    """
    initialize()  # a multi-process run named by the environment (a no-op otherwise, or if joined)
    done = finished_summary(tc)
    if done is not None:
        ckpt_dir = os.path.join(tc.out_dir, "checkpoints")
        if os.path.isdir(ckpt_dir):  # same config as the checkpoints, too
            probe = Checkpointer(ckpt_dir, tc.identity(), tc.save_every, tc.keep)
            try:
                if probe.latest_step() is not None:
                    probe.check_identity(probe.latest_step())
            finally:
                probe.close()
        print(f"already finished ({done['steps']} steps): summary in "
              f"{os.path.join(tc.out_dir, 'summary.json')}, adapter in "
              f"{os.path.join(tc.out_dir, 'adapter')}; nothing changed (another out_dir trains anew)")
        return {**done, "already_finished": True}
    os.makedirs(tc.out_dir, exist_ok=True)
    cfg, tokenizer = model_config(tc)
    adapter = init_adapter(cfg, tc.adapter, jax.random.key(tc.init_seed + 1))
    state = init_state(adapter, tc.optim, tc.init_seed)
    placement = make_placement(tc, cfg, abstract_params(cfg, _DTYPES[tc.dtype]), state)
    # Made in place: each process reads only the blocks its devices hold.
    params = load_weights(tc, cfg, placement.params)
    data = load_data(tc.data, tokenizer, bos_id=cfg.bos_token_id, eos_id=cfg.eos_token_id)
    if data.train.tokens.size and int(data.train.tokens.max()) >= cfg.vocab_size:
        raise ValueError(
            f"the tokenizer produced id {int(data.train.tokens.max())}, outside the model's "
            f"vocabulary ({cfg.vocab_size}): tokenizer and model do not belong together"
        )
    # A restore reads into these shardings: a checkpoint of one mesh resumes on another.
    state = jax.device_put(state, placement.state)

    ckpt = Checkpointer(os.path.join(tc.out_dir, "checkpoints"), tc.identity(), tc.save_every, tc.keep)
    try:
        return _run(tc, ckpt, state, params, cfg, data, placement, stop_after, progress)
    except KeyboardInterrupt as e:
        if isinstance(e, TrainingInterrupted):
            raise
        ckpt.close()  # Ctrl-C outside the steps (restore, first eval, export)
        raise _interrupted(None, ckpt, tc) from e
    finally:
        ckpt.close()


def _run(tc, ckpt, state, params, cfg, data, placement, stop_after, progress) -> dict:
    """The loop of :func:`train`, from restore to export (``ckpt`` closed by the caller)."""
    primary = jax.process_index() == 0  # the one writer of the run's own files
    metrics_path = os.path.join(tc.out_dir, "metrics.jsonl")
    data_state = None
    if ckpt.latest_step() is not None:
        state, saved_data_state, step = ckpt.restore(state)
        data_state = DataState(**saved_data_state)
        if primary:
            _truncate_metrics(metrics_path, step)
        print(f"resumed from step {step} ({ckpt.directory})")
    elif primary and os.path.exists(metrics_path):
        os.remove(metrics_path)
    check_adapter(state.adapter, cfg)
    A, B, T = tc.optim.grad_accum, tc.data.batch_size, tc.data.seq_len
    # Each process builds only the rows of each batch that its devices hold.
    train_batches = TrainBatches(data.train, tc.data, state=data_state,
                                 rows=local_rows(placement.batch, (A, B, T), axis=1))
    eval_batches = EvalBatches(data.validation, tc.data,
                               rows=local_rows(placement.eval_batch, (B, T), axis=0))
    put_eval = lambda batch: to_global(batch, placement.eval_batch, (B, T))  # noqa: E731
    # The step's static arguments that change memory and speed, not results.
    attention = dict(attention_chunk=tc.attention_chunk, attention_impl=tc.attention_impl,
                     loss_chunk=tc.loss_chunk)
    if not len(eval_batches):
        print("note: the held-out split is empty (data.validation_fraction); no eval_loss is logged")

    start = int(state.step)
    end = tc.optim.steps if stop_after is None else min(tc.optim.steps, start + stop_after)
    bar = tqdm(total=tc.optim.steps, initial=start, disable=not (progress and primary), unit="step",
               dynamic_ncols=True)
    t0 = time.perf_counter()
    at = None  # the step in progress, for the Ctrl-C message
    last = {}
    try:
        with open(metrics_path if primary else os.devnull, "a") as log:
            if start == 0:  # the starting point of the held-out curve
                initial = evaluate(state.adapter, params, eval_batches, cfg, tc.eval_batches,
                                   put_eval, step_fn=placement.eval_step, **attention)
                log.write(json.dumps({"step": 0, "eval_loss": initial}) + "\n")
            for step in range(start, end):
                at = step + 1
                host = _attention_rows(_stack_micro(train_batches, A), tc.attention_impl)
                batch = to_global(host, placement.batch, (A, B, T))
                state, metrics = train_step(state, params, batch, placement=placement, cfg=cfg,
                                            oc=tc.optim, remat=tc.remat, **attention)
                # The loop already brings every step's metrics to the host: checking them is free.
                m = jax.device_get(metrics)
                record = {"step": step + 1, **{k: float(v) for k, v in m.items() if k != "usage"}}
                if "usage" in m:
                    record["usage"] = np.round(m["usage"], 4).tolist()
                if (step + 1) % tc.eval_every == 0 or step + 1 == tc.optim.steps:
                    record["eval_loss"] = evaluate(
                        state.adapter, params, eval_batches, cfg, tc.eval_batches,
                        put_eval, step_fn=placement.eval_step, **attention)
                _check_finite(step + 1, record, ckpt)
                log.write(json.dumps(record) + "\n")
                log.flush()
                last = record
                # The data state after this step's batches: a resume continues with the next ones.
                # The step's update can be non-finite while its loss (of the state before) is
                # not: save checks the state itself before it can replace a good checkpoint.
                try:
                    ckpt.save(step + 1, state, train_batches.state().to_dict(),
                              force=step + 1 == tc.optim.steps)
                except NonFiniteStateError as e:
                    raise _diverged(step + 1, "non-finite state in " + ", ".join(e.leaves[:4]), ckpt) from e
                bar.update(1)
                if (step + 1) % tc.log_every == 0 or step + 1 == end:
                    post = {"loss": f"{record['loss']:.3f}", "aux": f"{record['aux']:.3f}"}
                    if record.get("eval_loss") is not None:
                        post["eval"] = f"{record['eval_loss']:.3f}"
                    bar.set_postfix(post)
    except KeyboardInterrupt as e:
        ckpt.close()  # finishes a save in flight, so latest_step is what a rerun restores
        raise _interrupted(at, ckpt, tc) from e
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    if primary:
        last, usage = _summarize(_read_metrics(metrics_path), end)
    else:  # the others summarize only what they saw (they write nothing)
        usage = None
    summary = {"steps": end, "seconds": seconds, "last": last}
    if end < tc.optim.steps:
        return summary
    bad = nonfinite_leaves(state.adapter)
    if bad:  # e.g. restored from a finished run's last checkpoint; never export NaN
        raise _diverged(end, "non-finite adapter in " + ", ".join(bad[:4]), ckpt)
    adapter = _host(state.adapter)  # every process takes part in the gather
    if not primary:
        return summary
    save_adapter(adapter, os.path.join(tc.out_dir, "adapter"), cfg)
    if usage is not None:
        summary["usage"] = usage.tolist()
        _usage_plot(usage, tc.adapter.mode, os.path.join(tc.out_dir, "usage.png"))
        print("expert usage over the run (fraction of assignments):\n" + usage_text(usage))
    summary["identity"] = tc.identity()
    path = os.path.join(tc.out_dir, "summary.json")
    with open(path + ".tmp", "w") as f:  # summary.json marks the run finished: whole or absent
        json.dump(summary, f, indent=2)
    os.replace(path + ".tmp", path)
    return summary
