"""Checkpoints of training runs (orbax), read back by training and by evaluation."""

from __future__ import annotations

from typing import Any

import jax


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
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)

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

    def restore(self, step: int, like, shardings) -> tuple[Any, dict]:
        """The checkpoint at `step`, placed with `shardings` (may differ from the saving run's)."""
        args = self._ocp.args
        abstract = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), like, shardings
        )
        restored = self.manager.restore(
            step, args=args.Composite(state=args.StandardRestore(abstract), meta=args.JsonRestore())
        )
        return restored["state"], restored["meta"]

    def resolve_step(self, step: int | str) -> int:
        """"latest", "best" (by eval top-1) or a step number -> a saved step."""
        latest = self.manager.latest_step()
        if latest is None:
            raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
        if step == "latest":
            return latest
        if step == "best":
            meta = self.manager.restore(latest, args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore()))
            if meta["meta"]["best_step"] is None:
                raise ValueError(f"{self.manager.directory} has no evaluated checkpoint yet")
            return meta["meta"]["best_step"]
        if int(step) not in self.manager.all_steps():
            raise ValueError(f"no checkpoint for step {step}; saved: {sorted(self.manager.all_steps())}")
        return int(step)

    def restore_params(self, step: int | str = "latest"):
        """The parameters saved at `step`, on the first local device, whatever
        topology saved them (the target tree is built from the stored metadata)."""
        step = self.resolve_step(step)
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        stored = self.manager.item_metadata(step)["state"]
        target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local), stored)
        args = self._ocp.args
        restored = self.manager.restore(step, args=args.Composite(state=args.StandardRestore(target)))
        return restored["state"]["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
