"""Training with token merging: the train state, the steps, the loop with its checkpoints.

The steps are sharded over a device mesh (`tome_jax.sharding`): the same code
runs on one device, on many, and on many hosts.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from tome_jax import budget, data, evaluate, method_config, schedules
from tome_jax.data import mixing
from tome_jax.checkpoints import Checkpoints
from tome_jax.divergence import DIVERGED_HINT, NonFiniteError, all_finite, check_finite_metrics
from tome_jax.metrics_log import MetricWriter, drop_metrics_after
from tome_jax.optim import make_optimizer
from tome_jax.preemption import Preemption, exit_now
from tome_jax.sharding import batch_sharding, global_batch, make_mesh, process_rows, shardings_for
from tome_jax.vit import ViT, init_params


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the config (data order and RNG derive from step).

    step: train_step calls so far (micro-batches when accumulating gradients).
    """

    step: jax.Array
    params: Any
    opt_state: Any


# ---------------------------------------------------------------- state and steps


def create_state(
    model: ViT, tx: optax.GradientTransformation, mesh: Mesh, *, rng, params=None
) -> tuple[TrainState, Any]:
    """A sharded TrainState, from `params` (e.g. converted timm weights) or fresh init.

    Returns the state and its shardings (a TrainState of NamedShardings).
    """
    def init(rng, params):
        if params is None:
            params = init_params(model, rng)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    abstract = jax.eval_shape(init, rng, params)
    shardings = shardings_for(abstract, mesh)
    state = jax.jit(init, out_shardings=shardings)(rng, params)
    return state, shardings


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy against soft targets [batch, classes], in float32."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def make_train_step(model: ViT, tx, schedule, config, mesh: Mesh, state_shardings):
    """The jitted, sharded `(state, batch, rng) -> (state, metrics)`.

    Mixup/CutMix and stochastic depth draw from `fold_in(rng, state.step)`, so a
    resumed run repeats the randomness of an uninterrupted one.
    """
    num_classes = model.num_classes
    r = schedules.parse_r_value(config.r)

    def train_step(state: TrainState, batch, rng):
        step_rng = jax.random.fold_in(rng, state.step)
        mix_rng, dropout_rng, reduction_rng = jax.random.split(step_rng, 3)
        labels = batch["labels"]
        if config.mixup_alpha > 0 or config.cutmix_alpha > 0:
            images, targets = mixing.mixup_cutmix(
                mix_rng,
                batch["images"],
                labels,
                num_classes,
                mixup_alpha=config.mixup_alpha,
                cutmix_alpha=config.cutmix_alpha,
                label_smoothing=config.label_smoothing,
            )
        else:
            images = batch["images"]
            targets = mixing.one_hot_smoothed(labels, num_classes, config.label_smoothing)

        def loss_fn(params):
            # The model may sow terms of its own objective in "losses" (DiffRate's
            # FLOPs penalty) and figures to log in "metrics".
            logits, sown = model.apply(
                {"params": params}, images, r=r, train=True,
                rngs={"dropout": dropout_rng, "reduction": reduction_rng}, mutable=["losses", "metrics"],
            )
            classification = cross_entropy(logits, targets)
            loss = classification + sum(jax.tree_util.tree_leaves(sown.get("losses", {})))
            return loss, (logits, classification, sown.get("metrics", {}))

        (loss, (logits, classification, model_metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "accuracy": (logits.argmax(-1) == labels).mean(),
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state.step // config.grad_accum),
            **({"classification_loss": classification} if model_metrics else {}),
            **model_metrics,
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    replicated = NamedSharding(mesh, P())
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sharding(mesh), replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )


def make_predict(model: ViT, r, mesh: Mesh, params_shardings):
    """Sharded `(params, images) -> logits` for evaluation during training."""
    return jax.jit(
        lambda params, images: model.apply({"params": params}, images, r=r),
        in_shardings=(params_shardings, batch_sharding(mesh)),
        out_shardings=batch_sharding(mesh),
    )


# ---------------------------------------------------------------- the loop


def build_optimizer(config, model: ViT, params, total_steps: int):
    """The config's optimizer and learning-rate schedule for `model`'s parameters
    (`params`; None: those of a fresh init)."""
    abstract = params if params is not None else jax.eval_shape(lambda: init_params(model))
    return make_optimizer(config, abstract, total_steps)


def build_model_and_optimizer(config, total_steps: int):
    """The config's ViT, its initial parameters (None: fresh init) and optimizer."""
    model, params, _ = evaluate.load_model(config)
    return (model, params, *build_optimizer(config, model, params, total_steps))


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
    """train.py's job: train (or resume) per `config`, evaluating and checkpointing.

    Returns the last evaluation's metrics. When SIGTERM arrives (preemption) it
    saves the step it is at, skipping an evaluation due then, and exits with status
    143 (`exit_now`). Raises NonFiniteError when the loss, gradient or state turns
    NaN or infinite: checked on the metrics fetched every `log_every` steps, and on
    the state before every evaluation and save, so no checkpoint holds them.
    """
    evaluate.maybe_initialize_distributed(config)
    is_main = jax.process_index() == 0
    mesh = make_mesh(config.fsdp)
    workdir = pathlib.Path(workdir)

    # The model before the data: see tome_jax.data on the order of torch and TensorFlow.
    model, params, _ = evaluate.load_model(config)
    for key in ("r", "eval_r"):
        evaluate.check_layers(model, schedules.parse_r_value(config[key]), key)
    if is_main:
        write_run_record(config, model, workdir)
    train_data = data.builder(config.dataset, config.data_dir, download=config.get("download", True))
    steps_per_epoch = data.steps_per_epoch(train_data, config.train_split, config.batch_size, config.train_limit)
    data.check_batch_size(config.eval_batch_size // jax.process_count(), "eval_batch_size per process")
    total_steps = config.num_steps or int(config.num_epochs * steps_per_epoch)
    tx, schedule = build_optimizer(config, model, params, total_steps)
    evaluate.check_num_classes(model, train_data, config.dataset)
    state, shardings = create_state(model, tx, mesh, rng=jax.random.key(config.seed), params=params)
    checkpoints = Checkpoints(workdir / "checkpoints", keep=config.keep_checkpoints)
    state, meta = _resume(checkpoints, state, shardings, workdir, is_main)

    writer = MetricWriter(workdir, enabled=is_main)
    # Undecodable images, each logged once and recorded at the step whose batch
    # (or evaluation) met it: the data iterators call this inside next().
    skipped = data.SkippedExamples(lambda names: writer.write(loop.step, {"skipped": names}, "data"))
    loop = _Loop(
        config, total_steps, steps_per_epoch, state, meta,
        train_step=make_train_step(model, tx, schedule, config, mesh, shardings),
        batches=_train_batches(config, model, train_data, mesh, int(jax.device_get(state.step)), skipped),
        evaluate=_evaluator(config, model, train_data, mesh, shardings, skipped),
        checkpoints=checkpoints, writer=writer, preemption=Preemption(checkpoints.manager), mesh=mesh,
    )  # fmt: skip
    try:
        loop.run()
    finally:  # also when training stops on an error: a save in flight reaches disk
        loop.close()
    if loop.preempted:
        if is_main:
            print(f"preempted: saved step {loop.step}, exiting", flush=True)
        exit_now(143)
    if is_main:
        write_method_outputs(model, jax.device_get(loop.state.params), workdir)
    return {**loop.eval_metrics, **loop.meta}


def _resume(checkpoints: Checkpoints, state: TrainState, shardings, workdir: pathlib.Path, is_main: bool):
    """The latest intact checkpoint's state and meta (else `state` and empty meta), checked finite;
    metrics.jsonl trimmed to its step."""
    meta = {"best_top1": None, "best_step": None}
    restored = checkpoints.restore_latest(state, shardings)
    if restored is not None:
        state, meta = restored
        if is_main:
            print(f"resumed from step {int(state.step)}", flush=True)
    start_step = int(jax.device_get(state.step))
    # Compiles the check run before every save now, so a preemption's save never waits for it.
    if not bool(all_finite((state.params, state.opt_state))):
        raise NonFiniteError(f"the state at step {start_step} (initial or restored) holds NaN or infinity")
    if is_main:
        drop_metrics_after(workdir / "metrics.jsonl", start_step)
    return state, meta


def _train_batches(config, model: ViT, train_data, mesh: Mesh, start_step: int, skipped):
    """This process's rows of the training batches from `start_step` on (the order derives from the step)."""
    return data.train_batches(
        train_data,
        config.train_split,
        data.TrainAugment.from_config(config, model.image_hw),
        config.batch_size,
        seed=config.seed,
        start_step=start_step,
        limit=config.train_limit,
        shuffle_buffer=config.shuffle_buffer,
        rows=process_rows(mesh, config.batch_size),
        on_skip=skipped,
    )


def _evaluator(config, model: ViT, train_data, mesh: Mesh, shardings, skipped) -> Callable[[Any], dict]:
    """`params -> eval metrics` on the config's eval split, each process evaluating its share."""
    predict = make_predict(model, schedules.parse_r_value(config.eval_r), mesh, shardings.params)
    preprocess = data.Preprocess(
        size=model.image_hw, mean=tuple(config.mean), std=tuple(config.std),
        crop_pct=config.eval_crop_pct, interpolation=config.interpolation,
    )  # fmt: skip
    process_index, process_count = jax.process_index(), jax.process_count()

    def run(params):
        batches = data.eval_batches(
            train_data, config.eval_split, preprocess, config.eval_batch_size // process_count,
            limit=config.eval_limit, process_index=process_index, process_count=process_count, on_skip=skipped,
        )  # fmt: skip
        return evaluate.accuracy(predict, params, batches, put=lambda b: global_batch(b, mesh))

    return run


@dataclasses.dataclass
class _Loop:
    """The training loop: each step trains, and logs, evaluates and saves when due."""

    config: Any
    total_steps: int
    steps_per_epoch: int
    state: TrainState
    meta: dict
    train_step: Callable
    batches: Any
    evaluate: Callable[[Any], dict]
    checkpoints: Checkpoints
    writer: MetricWriter
    preemption: Preemption
    mesh: Mesh
    eval_metrics: dict = dataclasses.field(default_factory=dict)
    preempted: bool = False

    def __post_init__(self):
        self.step = int(jax.device_get(self.state.step))
        self._progress = tqdm(
            total=self.total_steps, initial=self.step, disable=not self.writer.enabled, desc="train", unit="step"
        )
        self._last_log, self._last_log_step = time.perf_counter(), self.step

    def run(self) -> None:
        """The steps after the state's; stops early, saved, on preemption."""
        rng = jax.random.key(self.config.seed)
        for self.step in range(self.step + 1, self.total_steps + 1):
            self.state, metrics = self.train_step(self.state, global_batch(next(self.batches), self.mesh), rng)
            self._progress.update()
            if self.step % self.config.log_every == 0 or self.step == self.total_steps:
                self._log(self.step, metrics)
            # Checked first: an evaluation is not worth a preemption's grace period.
            self.preempted = self.preemption.reached(self.step)
            self._evaluate_and_save(self.step)
            if self.preempted:
                return

    def _log(self, step: int, metrics) -> None:
        metrics = jax.device_get(metrics)
        check_finite_metrics(metrics, step, self.config.log_every)
        metrics["step_time_s"] = (time.perf_counter() - self._last_log) / (step - self._last_log_step)
        metrics["images_per_s"] = self.config.batch_size / metrics["step_time_s"]
        metrics["epoch"] = step / self.steps_per_epoch
        self.writer.write(step, metrics, "train")
        self._last_log, self._last_log_step = time.perf_counter(), step

    def _evaluate_and_save(self, step: int) -> None:
        config = self.config
        evaluating = (step % config.eval_every == 0 or step == self.total_steps) and not self.preempted
        saving = evaluating or self.preempted or step % config.checkpoint_every == 0
        if (evaluating or saving) and not bool(all_finite((self.state.params, self.state.opt_state))):
            raise NonFiniteError(
                f"step {step}: the parameters or optimizer state hold NaN or infinity (training "
                f"diverged since the last check); not evaluating or saving them. {DIVERGED_HINT}"
            )
        if evaluating:
            self.eval_metrics = self.evaluate(self.state.params)
            self.writer.write(step, self.eval_metrics, "eval")
            # Ties go to the later step, as orbax's BestN keeps the latest of equals.
            if self.meta["best_top1"] is None or self.eval_metrics["top1"] >= self.meta["best_top1"]:
                self.meta = {"best_top1": self.eval_metrics["top1"], "best_step": step}
            self._last_log = time.perf_counter()  # evaluation time is not training time
        if saving:
            top1 = {"top1": self.eval_metrics["top1"]} if evaluating else None
            self.checkpoints.save(self.state, self.meta, metrics=top1)

    def close(self) -> None:
        self.preemption.close()
        self._progress.close()
        self.checkpoints.wait()
        self.checkpoints.close()
        self.writer.close()


def write_run_record(config, model: ViT, workdir: pathlib.Path) -> None:
    """`run.json` in the workdir: the method that trains (name and every setting), the r schedules
    and the config, so that a workdir says how it was trained; the method printed too."""
    record = {**method_config.described(model.method), "r": config.r, "eval_r": config.eval_r}
    record["config"] = json.loads(config.to_json_best_effort())
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "run.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"method: {model.method.name} ({method_config.settings_text(model.method)}), r={config.r}, "
          f"eval_r={config.eval_r}", flush=True)


def write_method_outputs(model: ViT, params, workdir: pathlib.Path) -> None:
    """Writes the files the reduction method leaves after training (`Reduction.outputs`: DTEM's
    metric layers, DiffRate's searched schedule) to the workdir, and names them."""
    def gflops(method, r):
        return budget.gflops_per_image(model.clone(reduction=method), {"params": params}, r)

    for name, contents in model.method.outputs(model, params, gflops).items():
        (workdir / name).write_bytes(contents)
        print(f"wrote {workdir / name}", flush=True)
