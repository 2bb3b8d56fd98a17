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

import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["CheckpointError", "Checkpointer", "NonFiniteStateError", "nonfinite_leaves",
           "state_checksums"]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: written by another config, or incomplete/corrupt."""


class NonFiniteStateError(ValueError):
    """A state with NaN or infinite values was given to :meth:`Checkpointer.save` (not saved)."""


@jax.jit
def _finite_flags(tree) -> list[jax.Array]:
    """One bool per leaf: all its values finite (non-float leaves always are)."""
    return [jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
            for x in jax.tree.leaves(tree)]


def nonfinite_leaves(tree) -> list[str]:
    """The paths (``jax.tree_util.keystr``) of the leaves of ``tree`` holding NaN or inf.

    One jitted reduction and one small transfer: call it where the host syncs anyway.
    """
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    flags = jax.device_get(_finite_flags(tree))
    return [p for p, ok in zip(paths, flags) if not ok]


def state_checksums(tree) -> dict[str, str]:
    """``{leaf path: blake2b of dtype, shape and bytes}`` of the host copy of ``tree``."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
        x = np.ascontiguousarray(x)
        h = hashlib.blake2b(f"{x.dtype.str}{x.shape}".encode(), digest_size=16)
        h.update(x.view(np.uint8).reshape(-1) if x.size else b"")
        out[jax.tree_util.keystr(path)] = h.hexdigest()
    return out


def _diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
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
        """Save if ``step`` is due (or ``force``); returns whether it saved. Blocks until written.

        Raises:
          NonFiniteStateError: ``state`` holds NaN or inf (nothing written, nothing rotated out).
        """
        if not force and step % self.save_every:
            return False
        bad = nonfinite_leaves(state)
        if bad:
            raise NonFiniteStateError(
                f"refusing to save checkpoint {step}: non-finite values in {', '.join(bad[:4])}"
            )
        meta = {"identity": self.identity, "data_state": data_state, "step": int(step),
                "checksums": state_checksums(state)}
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
            raise self._damaged(step, f"{type(e).__name__}: {e}") from e
        diff = _diff(meta["identity"], self.identity)
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
            raise self._damaged(step, f"{type(e).__name__}: {e}") from e
        state = restored["state"]
        # Checkpoints written before checksums existed have none: the finiteness check remains.
        saved = meta.get("checksums")
        if saved is not None:
            now = state_checksums(state)
            changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            if changed:
                raise self._damaged(step, "arrays differ from the checksums saved with them: "
                                          + ", ".join(changed[:4]))
        bad = nonfinite_leaves(state)
        if bad:
            raise self._damaged(step, "non-finite values in " + ", ".join(bad[:4]))
        if int(state.step) != step:
            raise self._damaged(step, f"its state is at step {int(state.step)}")
        return state, meta["data_state"], step

    def close(self) -> None:
        self._manager.close()
