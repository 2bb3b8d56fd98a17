"""Training checkpoints with orbax: the whole :class:`TrainState`, the data position and the config.

Each checkpoint is a step folder written by ``orbax.checkpoint.CheckpointManager``, which writes to
a temporary folder and renames it when complete (atomic), keeps the last ``keep`` checkpoints and
never touches older ones while writing a new one. Beside the state we save JSON metadata: the
run's config (checked on resume) and the data iterator's state, so a resumed run draws exactly the
batches and dropout keys an uninterrupted run would have.

Integrity: a state with a non-finite float is never saved (so it can never rotate good checkpoints
out), and the metadata holds a checksum of every saved array (orbax 0.12 keeps none), checked on
restore with the finiteness of the restored state: a damaged step is named, with the folder to
delete to resume from the one before.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

__all__ = ["CheckpointError", "Checkpointer", "NonFiniteStateError", "identity_diff",
           "nonfinite_leaves", "state_checksums"]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: written by another config, or incomplete/corrupt."""


class NonFiniteStateError(ValueError):
    """A state with NaN or infinite values was given to :meth:`Checkpointer.save` (not saved).

    Attributes:
      leaves: the paths of the non-finite leaves.
    """

    def __init__(self, leaves: list[str]):
        super().__init__(f"non-finite values in {', '.join(leaves[:4])}; not saved")
        self.leaves = leaves


def _words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as a flat uint32 array (one word per element of 1, 2 or 4 bytes)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).reshape(-1)
    size = x.dtype.itemsize
    if size >= 4:  # 8-byte elements become 2 words
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    small = jax.lax.bitcast_convert_type(x, {2: jnp.uint16, 1: jnp.uint8}[size])
    return small.astype(jnp.uint32).reshape(-1)


@jax.jit
def _integrity(tree) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    """Per leaf: all values finite, and two wrapping uint32 sums of its words: plain and weighted
    by the odd numbers ``2i + 1``.

    Integer sums are exact in any reduction order (the same on any device or sharding), and a
    flipped bit ``k`` of word ``i`` changes them by ``2**k`` and ``(2i + 1) 2**k``, never 0 mod
    ``2**32``: every single-bit error shows; the weights also catch swapped words.
    """
    out = []
    for x in jax.tree.leaves(tree):
        finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
        w = _words(x)
        odd = jnp.arange(w.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
        out.append((finite, jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * odd, dtype=jnp.uint32)))
    return out


def _integrity_report(tree) -> tuple[list[str], dict[str, str]]:
    """``(paths of non-finite leaves, {path: dtype, shape and checksum})`` of ``tree``.

    One jitted pass over the arrays on their devices and a transfer of 3 scalars per leaf: call
    it where the host syncs anyway (a save, a restore).
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    values = jax.device_get(_integrity(tree))
    bad, sums = [], {}
    for (path, x), (finite, s1, s2) in zip(flat, values):
        key = jax.tree_util.keystr(path)
        if not finite:
            bad.append(key)
        sums[key] = f"{jnp.dtype(x.dtype).name}{list(x.shape)}:{int(s1):08x}{int(s2):08x}"
    return bad, sums


def nonfinite_leaves(tree) -> list[str]:
    """The paths (``jax.tree_util.keystr``) of the leaves of ``tree`` holding NaN or inf."""
    return _integrity_report(tree)[0]


def state_checksums(tree) -> dict[str, str]:
    """``{leaf path: "dtype[shape]:checksum"}``: what :meth:`Checkpointer.save` stores."""
    return _integrity_report(tree)[1]


@contextlib.contextmanager
def _hold_ctrl_c():
    """Hold a Ctrl-C until the block ends, then raise it; a second Ctrl-C interrupts at once.

    A save interrupted inside orbax's wait is finished by its thread anyway, after orbax has
    logged a traceback and dropped the step from its list: the step a rerun resumes from would
    be misreported. Saves take about a second, so holding the first Ctrl-C costs little.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    pending = []

    def hold(signum, frame):
        if pending:
            raise KeyboardInterrupt
        pending.append(signum)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pending:
        raise KeyboardInterrupt


def _quiet_abandoned_reads() -> None:
    """Drop the "Event loop is closed" reports of a failed orbax restore (only those).

    Orbax runs a restore on a private event loop and closes it on the first error; the reads
    still in flight then report to the closed loop, through ``sys.unraisablehook``, as dozens of
    tracebacks (seconds later) that bury the one line saying which checkpoint is damaged.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_drops_closed_loop", False):
        return

    def hook(unraisable):
        exc = unraisable.exc_value
        if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
            previous(unraisable)

    hook._drops_closed_loop = True
    sys.unraisablehook = hook


def _short(e: Exception, limit: int = 300) -> str:
    """An orbax/tensorstore error in one short line (they append kilobytes of specs)."""
    text = str(e).split("\n")[0].split(" [tensorstore_spec")[0].strip()
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def identity_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``["key.path: checkpoint A vs now B", ...]`` for the values that differ."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r} vs now {b!r}")
    return out


class Checkpointer:
    """Save every ``save_every`` steps into ``directory``, keep ``keep``, restore the latest.

    Args:
      directory: the run's checkpoint folder (created).
      identity: the config values a checkpoint must match to be resumed (model, adapter, data,
        optimizer); a mismatch raises :class:`CheckpointError` listing the differences.
    """

    def __init__(self, directory: str | os.PathLike, identity: dict, save_every: int, keep: int):
        self.directory = os.path.abspath(os.fspath(directory))
        self.identity = identity
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def reload(self) -> None:
        """Re-read the steps on disk (orbax caches them)."""
        self._manager.reload()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def step_dir(self, step: int) -> str:
        """The folder of checkpoint ``step``."""
        return os.path.join(self.directory, str(step))

    def _damaged(self, step: int, why: str) -> CheckpointError:
        earlier = [s for s in self.all_steps() if s < step]
        then = f"resume from step {max(earlier)}" if earlier else "start over"
        return CheckpointError(
            f"checkpoint {step} in {self.directory} is incomplete or corrupt ({why}); earlier "
            f"checkpoints {earlier} are untouched: delete step {step} ({self.step_dir(step)}) to "
            f"{then}"
        )

    def save(self, step: int, state, data_state: dict, force: bool = False) -> bool:
        """Save if ``step`` is due (or ``force``); returns whether it saved. Blocks until written;
        a Ctrl-C meanwhile is raised once the checkpoint is whole.

        Raises:
          NonFiniteStateError: ``state`` holds NaN or inf (nothing written, nothing rotated out).
        """
        if not force and step % self.save_every:
            return False
        bad, checksums = _integrity_report(state)
        if bad:
            raise NonFiniteStateError(bad)
        meta = {"identity": self.identity, "data_state": data_state, "step": int(step),
                "checksums": checksums}
        with _hold_ctrl_c():
            self._manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=True,
            )
            self._manager.wait_until_finished()
        return True

    def check_identity(self, step: int) -> dict:
        """The metadata of checkpoint ``step``, after checking it was written by this config.

        Raises:
          CheckpointError: unreadable metadata, or another config (the differences listed).
        """
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - orbax raises many types for damaged folders
            _quiet_abandoned_reads()
            raise self._damaged(step, _short(e)) from e
        diff = identity_diff(meta["identity"], self.identity)
        if diff:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} was written by another config:\n  "
                + "\n  ".join(diff)
                + "\nuse another output folder, or the same config to resume"
            )
        return meta

    def restore(self, abstract_state, step: int | None = None):
        """Restore ``(state, data_state, step)`` from ``step`` (default: the latest).

        ``abstract_state`` gives the tree structure, shapes, dtypes and shardings to restore into
        (e.g. ``jax.eval_shape`` of a fresh state, or the fresh state itself).

        Raises:
          CheckpointError: no checkpoint, another config, or a damaged one: unreadable, arrays
            that differ from their saved checksums, non-finite values or a wrong step counter.
            The message names the step folder to delete to resume from the one before.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        meta = self.check_identity(step)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            )
        except Exception as e:  # noqa: BLE001
            _quiet_abandoned_reads()
            raise self._damaged(step, _short(e)) from e
        state = restored["state"]
        # Checkpoints written before checksums existed have none: the finiteness check remains.
        bad, now = _integrity_report(state)
        saved = meta.get("checksums")
        if saved is not None:
            changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            if changed:
                raise self._damaged(step, "arrays differ from the checksums saved with them: "
                                          + ", ".join(changed[:4]))
        if bad:
            raise self._damaged(step, "non-finite values in " + ", ".join(bad[:4]))
        if int(state.step) != step:
            raise self._damaged(step, f"its state is at step {int(state.step)}")
        return state, meta["data_state"], step

    def close(self) -> None:
        self._manager.close()
