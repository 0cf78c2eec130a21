"""Accuracy, throughput and FLOPs of a ViT at each `r`, shared by eval.py and train.py."""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from flax import traverse_util

from tome_jax import budget, data, report, schedules
from tome_jax.checkpoints import Checkpoints
from tome_jax.convert import from_timm, pretrained_data_config
from tome_jax.measure import PredictFn, compile_predict, throughput
from tome_jax.vit import ViT, create_model


@jax.jit
def _correct_counts(logits, labels, mask):
    """Top-1 hits, top-5 hits, valid rows and valid rows with a non-finite logit, over one batch."""
    k = min(5, logits.shape[-1])
    top = jax.lax.top_k(logits, k)[1]
    hits = top == labels[:, None]
    nonfinite = ~jnp.isfinite(logits).all(-1) & mask
    return jnp.stack([(hits[:, 0] & mask).sum(), (hits.any(-1) & mask).sum(), mask.sum(), nonfinite.sum()])


def accuracy(
    predict: PredictFn,
    variables,
    batches: Iterable[dict[str, np.ndarray]],
    *,
    progress: str | None = None,
    total: int | None = None,
    put: Callable[[dict], dict] | None = None,
) -> dict[str, float]:
    """Top-1/top-5 over padded batches (`images`, `labels`, `mask`, see data.eval_batches).

    `put` turns a host batch into the arrays `predict` expects (e.g. global arrays
    split over a device mesh); counts stay on device until the end. Without `put`,
    on several processes, each passes its own share and the counts are summed. Any
    non-finite logit (NaN or inf: broken parameters, an overflow) is an error, never
    an accuracy; `progress` names the progress bar and the error.
    """
    counts = jnp.zeros(4, jnp.int32)
    for batch in tqdm(batches, desc=progress, total=total, disable=progress is None, leave=False):
        batch = put(batch) if put else batch
        logits = predict(variables, batch["images"])
        counts = counts + _correct_counts(logits, batch["labels"], batch["mask"])
    counts = jax.device_get(counts)
    if put is None and jax.process_count() > 1:
        counts = multihost_utils.process_allgather(counts).sum(0)
    top1, top5, count, nonfinite = (int(c) for c in counts)
    if count == 0:
        raise ValueError("no examples were evaluated")
    if nonfinite:
        raise ValueError(
            f"{progress + ': ' if progress else ''}{nonfinite} of {count} images gave non-finite logits "
            "(NaN or inf): the parameters hold NaN/inf, or the computation overflows"
        )
    return {"top1": top1 / count, "top5": top5 / count, "count": count, "nonfinite": nonfinite}


def sweep(
    model: ViT,
    variables,
    r_values: Sequence[schedules.RSpec],
    make_batches: Callable[[], Iterable[dict[str, np.ndarray]]],
    *,
    timing_images: Sequence[jax.Array],
    prop_attn: bool = True,
    runs: int = 5,
    num_batches: int | None = None,
    on_row: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per r: accuracy, images/s, GFLOPs per image, tokens left at the head.

    `make_batches()` yields eval batches of the same shape as `timing_images[i]`.
    `on_row(rows)` gets the rows so far after each one (to write them as they come,
    so a failure keeps every finished row).
    """
    rows = []
    for r in tqdm(r_values, desc="r sweep", unit="r"):
        predict, cost = compile_predict(model, r, variables, timing_images[0], prop_attn=prop_attn)
        schedule = schedules.parse_r(model.depth, r)
        tokens = schedules.tokens_per_layer(model.num_tokens, schedule, model.num_prefix_tokens)
        row = {"r": schedules.r_label(r), "schedule": list(schedules.effective_schedule(
            model.num_tokens, schedule, model.num_prefix_tokens)), "tokens_left": tokens[-1]}
        row.update(cost)
        row.update(accuracy(predict, variables, make_batches(), progress=f"r={row['r']}", total=num_batches))
        row.update(throughput(predict, variables, timing_images, runs=runs))
        rows.append(row)
        baseline = next((done for done in rows if done["tokens_left"] == model.num_tokens), None)
        for done in rows:
            done["speedup"] = done["images_per_s"] / baseline["images_per_s"] if baseline else None
        if on_row is not None:
            on_row(rows)
    return rows


# Set by cluster schedulers whose layout jax.distributed.initialize() detects itself.
CLUSTER_VARIABLES = (
    "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
)  # fmt: skip
DISTRIBUTED_KEYS = ("coordinator_address", "num_processes", "process_id")


def maybe_initialize_distributed(config) -> None:
    """`jax.distributed.initialize` for a run over several processes (hosts).

    With the config's `coordinator_address` ("host:port" of process 0),
    `num_processes` and `process_id` where set; else, under `distributed="auto"`,
    when a cluster's environment (SLURM, a TPU pod, JAX_COORDINATOR_ADDRESS) is
    detected, which JAX then reads itself. "on" always initializes, "off" never.
    """
    mode = config.get("distributed", "auto")
    given = {key: config.get(key) for key in DISTRIBUTED_KEYS if config.get(key) is not None}
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"config.distributed must be 'auto', 'on' or 'off', got {mode!r}")
    if mode == "off":
        if given:
            raise ValueError(f"config.distributed='off' but {', '.join(sorted(given))} set; drop them or use 'auto'")
        return
    if given or mode == "on" or any(v in os.environ for v in CLUSTER_VARIABLES):
        if not jax.distributed.is_initialized():
            jax.distributed.initialize(**given)


def text_of_process_zero(text: str, max_bytes: int = 4096) -> str:
    """Process 0's `text` on every process (the same `text` on one process)."""
    if jax.process_count() == 1:
        return text
    encoded = text.encode()
    if len(encoded) > max_bytes:
        raise ValueError(f"{len(encoded)} bytes do not fit the {max_bytes} sent between processes: {text[:80]!r}...")
    padded = np.frombuffer(encoded.ljust(max_bytes, b"\0"), np.uint8)
    return bytes(multihost_utils.broadcast_one_to_all(padded)).rstrip(b"\0").decode()


def resolve_source(source: str) -> str:
    """A checkpoint path relative to the working directory or the repository, else as is."""
    for candidate in (pathlib.Path(source), data.REPO / source):
        if candidate.suffix and candidate.exists():
            return str(candidate)
    return source


def load_model(config) -> tuple[ViT, Any, str]:
    """The ViT the config names, its parameters and the resolved source.

    `config.pretrained`: load `config.model` (timm name or checkpoint file) through
    `from_timm`; else build the registry architecture of that name and return None
    parameters, to be initialised by Flax (no torch or timm needed).
    Optional keys: `method` ("tome", or "dtem" for DTEM metric layers),
    `metric_layers` (a file of DTEM metric layers to add), `params_from` (a
    train.py workdir whose checkpoint replaces the parameters) and `params_step`
    ("best", "latest" or a step).
    """
    source = resolve_source(config.model)
    overrides = dict(config.model_overrides)
    method = config.get("method", "tome")
    if method not in ("tome", "dtem"):
        raise ValueError(f"config.method must be 'tome' or 'dtem', got {method!r}")
    if method == "dtem":
        overrides["dtem"] = True
    if not config.pretrained:
        model, params = create_model(source, **overrides), None
    else:
        metric_layers = config.get("metric_layers") or None
        model, variables = from_timm(source, metric_layers=metric_layers, **overrides)
        params = variables["params"]
    if config.get("params_from"):
        params = trained_params(config.params_from, config.get("params_step", "best"), model)
    return model, params, source


def trained_params(workdir: str, step, model: ViT):
    """Parameters from a train.py workdir's checkpoint, checked against `model`."""
    params = Checkpoints(pathlib.Path(workdir) / "checkpoints").restore_params(step)
    expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *model.input_shape)))["params"]
    shapes = lambda tree: {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(tree).items()}  # noqa: E731
    got, want = shapes(params), shapes(expected)
    if got != want:
        differ = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        hint = " (DTEM metric layers: set --config.method=dtem)" if any("metric" in k for k in differ) else ""
        raise ValueError(
            f"{workdir} does not hold this model's parameters{hint}: "
            + ", ".join(f"{k}: checkpoint {got.get(k)} vs model {want.get(k)}" for k in differ[:8])
        )
    return params


def preprocess_for(config, model: ViT, source: str):
    """Evaluation preprocessing: the model's timm config, or the config's own values."""
    size = model.image_hw
    if config.preprocess == "timm":
        timm_config = pretrained_data_config(source)
        if timm_config is None:
            raise ValueError(f"{source} carries no timm preprocessing; set config.preprocess='explicit'")
        return data.preprocess_from_config(timm_config, size)
    if config.preprocess != "explicit":
        raise ValueError(f"config.preprocess must be 'timm' or 'explicit', got {config.preprocess!r}")
    return data.Preprocess(
        size=tuple(size),
        mean=tuple(config.mean),
        std=tuple(config.std),
        crop_pct=config.crop_pct,
        interpolation=config.interpolation,
    )


def check_num_classes(model: ViT, dataset, name: str) -> None:
    """The model's head must have one output per class of the dataset. eval.py scores
    class logits, so a feature model (num_classes=0: SigLIP, DINOv2) needs a head."""
    classes = len(data.class_names(dataset))
    if model.num_classes == 0:
        raise ValueError(
            f"the model gives features (num_classes=0: SigLIP, DINOv2), not the class logits eval.py scores on "
            f"{name}: add a {classes}-class head, --config.model_overrides.num_classes={classes}, with its trained "
            "weights (--config.params_from=a train.py workdir), or evaluate a classifier checkpoint"
        )
    if classes != model.num_classes:
        raise ValueError(
            f"{name} has {classes} classes but the model's head has {model.num_classes} outputs; "
            f"use a model with a {classes}-class head, or a dataset of the model's {model.num_classes} classes"
        )


def run(config) -> list[dict[str, Any]]:
    """eval.py's job: load, sweep r, print the table, write JSON/CSV/PNG to the workdir
    (after every row, so a failure keeps the finished ones).

    On several processes (`maybe_initialize_distributed`) each evaluates its share
    of the split on its own devices in batches of `batch_size`; top-1 and top-5
    count every example once, images/s and GFLOPs are each process's own, and
    process 0 prints and writes the results.
    """
    # Mistakes in r or the batch size fail here, before anything loads.
    r_values = schedules.parse_r_values(config.r)
    data.check_batch_size(config.batch_size)
    maybe_initialize_distributed(config)
    process_index, process_count = jax.process_index(), jax.process_count()
    is_main = process_index == 0
    model, params, source = load_model(config)
    for r in r_values:
        try:
            described = schedules.describe_r(r, model.num_tokens, model.depth, model.num_prefix_tokens)
        except (TypeError, ValueError) as error:
            raise ValueError(f"r={schedules.r_label(r)} does not fit the model: {error}") from None
        if is_main:
            print(described)
    dataset = data.builder(config.dataset, config.data_dir, download=config.get("download", True))
    check_num_classes(model, dataset, config.dataset)
    preprocess = preprocess_for(config, model, source)
    count = data.num_examples(dataset, config.split, config.limit)
    if count == 0:
        raise ValueError(f"split {config.split!r} of {config.dataset} has no examples")
    per_process = -(-count // process_count)
    num_batches = -(-per_process // config.batch_size)
    skipped = data.SkippedExamples()

    def make_batches():
        return data.eval_batches(
            dataset, config.split, preprocess, config.batch_size, limit=config.limit, on_skip=skipped,
            process_index=process_index, process_count=process_count,
        )

    timing_images = [jnp.asarray(b["images"]) for _, b in zip(range(3), make_batches())]
    if params is None:
        params = jax.jit(model.init)(jax.random.key(0), timing_images[0][:1])["params"]
    variables = jax.device_put({"params": params})
    for r, target in budget.config_targets(
        model, variables, config, batch_size=config.batch_size, images=timing_images
    ):
        # A speed-up target is measured on each process: all take process 0's choice.
        r = schedules.parse_r_value(text_of_process_zero(schedules.r_label(r)))
        if is_main:
            print(f"{target}: {schedules.describe_r(r, model.num_tokens, model.depth, model.num_prefix_tokens)}")
        r_values.append(r)
    meta = {
        "model": config.model,
        "dataset": config.dataset,
        "split": config.split,
        "examples": count,
        "batch_size": config.batch_size,
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "title": f"{pathlib.Path(config.model).name} on {config.dataset}/{config.split} ({count} images)",
        "skipped": skipped.names,  # undecodable images, counted out of every row
    }
    rows = sweep(
        model,
        variables,
        r_values,
        make_batches,
        timing_images=timing_images,
        prop_attn=config.prop_attn,
        runs=config.timing_runs,
        num_batches=num_batches,
        on_row=lambda rows: report.write_results(rows, config.workdir, meta) if is_main else None,
    )
    if is_main:
        print(report.format_table(rows))
        if skipped.names:
            print(f"skipped {len(skipped.names)} undecodable image(s), counted out: {', '.join(skipped.names)}")
        print(f"wrote {config.workdir}/sweep.json, sweep.csv, sweep.png")
    return rows
