"""Checkpoints of training runs (orbax), read back by training and by evaluation."""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import jax
import numpy as np


class CheckpointError(OSError):
    """A checkpoint that does not read back (a truncated, missing or garbled file);
    the message names its path and what failed."""


class CheckpointMismatchError(ValueError):
    """A checkpoint that reads back but holds another model or optimizer state."""


def describe(error: BaseException) -> str:
    """One line for a read error: the innermost cause (orbax wraps TensorStore's
    message, which names the file, in a long dump of the read spec)."""
    while True:
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None:
            break
        error = inner
    message = next((line for line in str(error).splitlines() if line.strip()), "")
    message = message.split(" [tensorstore_spec=")[0]
    message = message if len(message) <= 300 else message[:300] + "..."
    return f"{type(error).__name__}: {message}"


def leaf_name(path) -> str:
    """A tree path as orbax names the leaf: keys, attributes and indices joined by dots."""
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def all_processes_agree(ok: bool) -> bool:
    """True when `ok` on every process (one small all-gather on multi-host runs)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(multihost_utils.process_allgather(np.asarray(ok)).all())


class Checkpoints:
    """orbax CheckpointManager keeping the last `keep` checkpoints and the best by top-1.

    Saves are asynchronous: `save` returns once the arrays are copied off the
    devices, and the files are written in the background, committed atomically.
    """

    def __init__(self, directory, keep: int = 3, async_save: bool = True):
        import orbax.checkpoint as ocp
        from orbax.checkpoint import checkpoint_managers as policies

        preserve = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=keep),
                policies.BestN(get_metric_fn=lambda m: m["top1"], n=1, keep_checkpoints_without_metrics=False),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preserve, enable_async_checkpointing=async_save, create=True
        )
        self._ocp = ocp
        # orbax refuses a relative path, and only at the first asynchronous save.
        self.directory = pathlib.Path(directory).absolute()
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        except Exception as error:  # noqa: BLE001 (orbax and TensorStore raise many kinds)
            raise CheckpointError(f"{directory}: {describe(error)}") from None
        # Restores read through the handlers, not the manager: the manager's restore
        # ends in a barrier across processes, which a process whose read failed never
        # reaches; this way every process reports before they agree on what to do.
        self._readers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}

    def save(self, state, meta: dict, metrics: dict | None = None) -> None:
        """Saves `state` (a pytree with an int `step`, e.g. `train_lib.TrainState`) and `meta` (JSON)."""
        args = self._ocp.args
        self.manager.save(
            int(jax.device_get(state.step)),
            args=args.Composite(state=args.StandardSave(state), meta=args.JsonSave(meta)),
            metrics=metrics,
            force=True,
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_path(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def stored_metadata(self, step: int):
        """The tree of orbax ArrayMetadata (shape, dtype, ...) of the state saved at `step`."""
        path = self.step_path(step) / "state"
        try:
            return self._readers["state"].metadata(path)
        except Exception as error:  # noqa: BLE001
            raise CheckpointError(f"{path}: metadata does not read ({describe(error)})") from None

    def stored_shapes(self, step: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """{leaf name: (shape, dtype)} of the state saved at `step`, from its metadata."""
        leaves = jax.tree_util.tree_flatten_with_path(self.stored_metadata(step))[0]
        return {leaf_name(p): (tuple(m.shape), np.dtype(m.dtype)) for p, m in leaves}

    def check_holds(self, step: int, like) -> None:
        """Raises CheckpointMismatchError unless `step` holds arrays of `like`'s names,
        shapes and dtypes (another model, optimizer or `trainable` leaves them differing)."""
        stored = self.stored_shapes(step)
        wanted = {
            leaf_name(p): (tuple(a.shape), np.dtype(a.dtype)) for p, a in jax.tree_util.tree_flatten_with_path(like)[0]
        }
        if stored != wanted:
            differ = sorted(  # parameters first: they say most about the model
                (k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k)),
                key=lambda k: (not k.startswith("params."), k),
            )
            raise CheckpointMismatchError(
                f"{self.step_path(step)} holds another model or optimizer state than this config "
                f"builds ({len(differ)} arrays differ, e.g. "
                + ", ".join(f"{k}: saved {_shape(stored.get(k))} vs now {_shape(wanted.get(k))}" for k in differ[:3])
                + "); use another workdir, or the config that wrote it"
            )

    def restore(self, step: int, like, shardings) -> tuple[Any, dict]:
        """The checkpoint at `step`, placed with `shardings` (may differ from the saving run's).

        Raises CheckpointMismatchError when it holds other arrays than `like`, and
        CheckpointError (naming the path) when it does not read back whole.
        """
        self.check_holds(step, like)
        path = self.step_path(step)
        args = self._ocp.args
        abstract = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), like, shardings
        )
        state = self._read(path / "state", args.StandardRestore(abstract))
        meta = self._read(path / "meta", args.JsonRestore())
        saved_step = int(jax.device_get(state.step))
        if saved_step != step:
            raise CheckpointError(f"{path}: holds step {saved_step}, not {step}")
        return state, meta

    def _read(self, path: pathlib.Path, restore_args):
        """One item of a step (`state` or `meta`), any read error a CheckpointError."""
        try:
            return self._readers[path.name].restore(path, args=restore_args)
        except Exception as error:  # noqa: BLE001
            raise CheckpointError(f"{path}: {describe(error)}") from None

    def restore_latest(self, like, shardings) -> tuple[Any, dict] | None:
        """The newest checkpoint that reads back whole (`restore`), or None if there is none.

        A newer one that does not read (a truncated or missing file, garbled
        metadata, on any process) is moved aside to `STEP.corrupt` with a warning
        naming the path and the failure, so the resumed run can save that step
        again. A checkpoint of another model or optimizer is an error, never
        skipped; when no checkpoint reads, nothing is moved and the error lists all.
        """
        failures = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored, problem = self.restore(step, like, shardings), None
            except CheckpointError as error:
                restored, problem = None, str(error)
            if not all_processes_agree(problem is None):
                failures.append((step, problem or f"{self.step_path(step)}: another process could not read it"))
                continue
            for failed_step, problem in failures:
                moved = self.move_aside(failed_step)
                if jax.process_index() == 0:
                    print(f"warning: skipping checkpoint {problem}; moved it to {moved}", file=sys.stderr, flush=True)
            return restored
        if failures:
            raise CheckpointError(
                f"no checkpoint in {self.directory} reads back: " + "; ".join(p for _, p in failures)
                + ". Move them away to start afresh"
            )
        return None

    def move_aside(self, step: int) -> pathlib.Path:
        """Renames step `step` to `STEP.corrupt` (orbax ignores it), on process 0."""
        source = self.step_path(step)
        target = source.with_name(f"{step}.corrupt")
        suffix = 1
        while target.exists():
            target, suffix = source.with_name(f"{step}.corrupt{suffix}"), suffix + 1
        if jax.process_index() == 0:
            source.rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"tome_jax moved checkpoint {step} aside")
        self.manager.reload()
        return target

    def resolve_step(self, step: int | str) -> int:
        """"latest", "best" (by eval top-1) or a step number -> a saved step."""
        latest = self.manager.latest_step()
        if latest is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step == "latest":
            return latest
        if step == "best":
            meta = self._read(self.step_path(latest) / "meta", self._ocp.args.JsonRestore())
            if meta["best_step"] is None:
                raise ValueError(f"{self.directory} has no evaluated checkpoint yet")
            return meta["best_step"]
        if int(step) not in self.manager.all_steps():
            raise ValueError(f"no checkpoint for step {step}; saved: {sorted(self.manager.all_steps())}")
        return int(step)

    def restore_params(self, step: int | str = "latest"):
        """The parameters saved at `step`, on the first local device, whatever
        topology saved them (the target tree is built from the stored metadata)."""
        step = self.resolve_step(step)
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        stored = self.stored_metadata(step)
        target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local), stored)
        return self._read(self.step_path(step) / "state", self._ocp.args.StandardRestore(target))["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _shape(entry) -> str:
    return "nothing" if entry is None else f"{entry[1].name}{list(entry[0])}"
