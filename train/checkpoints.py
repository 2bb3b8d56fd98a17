"""Training checkpoints with orbax: the whole :class:`TrainState`, the data position and the config.

Each checkpoint is a step folder written by ``orbax.checkpoint.CheckpointManager``, which writes to
a temporary folder and renames it when complete (atomic), keeps the last ``keep`` checkpoints and
never touches older ones while writing a new one. Beside the state we save JSON metadata: the
run's config (checked on resume) and the data iterator's state, so a resumed run draws exactly the
batches and dropout keys an uninterrupted run would have.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

__all__ = ["CheckpointError", "Checkpointer"]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: written by another config, or incomplete/corrupt."""


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

    def save(self, step: int, state, data_state: dict, force: bool = False) -> bool:
        """Save if ``step`` is due (or ``force``); returns whether it saved. Blocks until written."""
        if not force and step % self.save_every:
            return False
        meta = {"identity": self.identity, "data_state": data_state, "step": int(step)}
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self._manager.wait_until_finished()
        return True

    def restore(self, abstract_state, step: int | None = None):
        """Restore ``(state, data_state, step)`` from ``step`` (default: the latest).

        ``abstract_state`` gives the tree structure, shapes, dtypes and shardings to restore into
        (e.g. ``jax.eval_shape`` of a fresh state, or the fresh state itself).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - orbax raises many types for damaged folders
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} is incomplete or corrupt ({type(e).__name__}: "
                f"{e}); earlier checkpoints {self.all_steps()} are untouched: delete step {step} "
                "to resume from the one before"
            ) from e
        diff = _diff(meta["identity"], self.identity)
        if diff:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} was written by another config:\n  "
                + "\n  ".join(diff)
                + "\nuse another output folder, or the same config to resume"
            )
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            )
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} is incomplete or corrupt ({type(e).__name__}: "
                f"{e}); earlier checkpoints {self.all_steps()} are untouched: delete step {step} "
                "to resume from the one before"
            ) from e
        return restored["state"], meta["data_state"], step

    def close(self) -> None:
        self._manager.close()
