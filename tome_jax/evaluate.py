"""Accuracy, throughput and FLOPs of a ViT at each `r`, shared by eval.py and train.py."""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from flax import traverse_util

from tome_jax import budget, data, method_config, report, schedules
from tome_jax.checkpoints import Checkpoints
from tome_jax.convert import from_hf, from_timm, is_hf_source, is_timm_name, pretrained_data_config
from tome_jax.measure import PredictFn, compile_predict, throughput
from tome_jax.registry import create_model
from tome_jax.vit import ViT, init_params


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
    prop_attn: bool | None = None,
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
        effective = model.effective_schedule(r)
        row = {
            "method": model.method.name,
            "settings": method_config.settings_text(model.method),
            "r": schedules.r_label(r),
            "schedule": list(effective),
            "tokens_left": model.num_tokens - sum(effective),
        }
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


def load_model(config) -> tuple[ViT, Any, str]:
    """The ViT the config names, its parameters and the resolved source.

    `config.pretrained`: load `config.model` (timm name or checkpoint file) through
    `from_timm`; else its architecture and None parameters (`model_from_source`).
    Optional keys: `method` (a `tome_jax.reduce.METHODS` name, "tome" by default,
    whose settings are `config[method]`, see `method_config`; checked first),
    `metric_layers` (a file of DTEM metric layers to add), `params_from` (a
    train.py workdir whose checkpoint replaces the parameters) and `params_step`
    ("best", "latest" or a step).
    """
    method_config.check(config)
    source = data.find_shipped(config.model)  # the configs' assets/NAME from any folder
    given = {k: v for k, v in dict(config.model_overrides).items() if v is not None}  # unset: the model's own
    overrides = {"reduction": method_config.reduction(config), **given}
    metric_layers = config.get("metric_layers") or None
    model, params = model_from_source(source, pretrained=config.pretrained, metric_layers=metric_layers, **overrides)
    model.method.check_depth(model.depth)
    if config.get("params_from"):
        params = trained_params(config.params_from, config.get("params_step", "best"), model)
    return model, params, source


def check_layers(model: ViT, r: schedules.RSpec, name: str = "r") -> None:
    """A per-layer `r` must give one value per block of `model` (a command's r is never padded unsaid)."""
    if schedules.is_per_layer(r):
        schedules.check_per_layer(name, r, model.depth)


def model_from_source(source: str, *, pretrained: bool, metric_layers=None, **overrides) -> tuple[ViT, Any]:
    """The ViT `source` names (a timm name, a checkpoint file, a Hugging Face model directory
    or hub id) and its parameters.

    Not `pretrained`: the parameters are None, for Flax to initialise; a name is then
    the registry's architecture (no torch or timm needed), a file the one it holds.
    """
    if not pretrained and is_timm_name(source):
        return create_model(source, **overrides), None
    if is_hf_source(source):
        if metric_layers is not None:
            raise ValueError(f"{source} is a Hugging Face model: DTEM metric_layers go with timm checkpoints only")
        model, variables = from_hf(source, **overrides)
    else:
        model, variables = from_timm(source, metric_layers=metric_layers, **overrides)
    return model, variables["params"] if pretrained else None


def trained_params(workdir: str, step, model: ViT):
    """Parameters from a train.py workdir's checkpoint, checked against `model`."""
    params = Checkpoints(pathlib.Path(workdir) / "checkpoints").restore_params(step)
    expected = jax.eval_shape(lambda: init_params(model))
    shapes = lambda tree: {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(tree).items()}  # noqa: E731
    got, want = shapes(params), shapes(expected)
    if got != want:
        differ = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        hint = ""
        if any(k.endswith("/metric/kernel") and k not in want for k in got):
            hint = " (it holds DTEM metric layers: set --config.method=dtem)"
        elif any(k.endswith("/metric/kernel") and k not in got for k in want):
            hint = " (the run trained no DTEM metric layers: evaluate it with the method it trained with)"
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


class _Setup(NamedTuple):
    """What a run evaluates on: the model and variables, the data and its description."""

    model: ViT
    variables: Any
    make_batches: Callable[[], Iterable[dict[str, np.ndarray]]]
    timing_images: list[jax.Array]
    num_batches: int
    meta: dict[str, Any]
    skipped: data.SkippedExamples
    is_main: bool


def _setup(config, r_values: Sequence[schedules.RSpec] = ()) -> _Setup:
    """Loads the model and its data; each of `r_values` is checked against the model
    (and described) before any data loads."""
    maybe_initialize_distributed(config)
    process_index, process_count = jax.process_index(), jax.process_count()
    is_main = process_index == 0
    # The model (and timm's preprocessing, for a timm name) before the data: see tome_jax.data
    # on the order of torch and TensorFlow.
    model, params, source = load_model(config)
    preprocess = preprocess_for(config, model, source)
    data.check_batch_size(config.batch_size)
    for r in r_values:
        check_layers(model, r)
        try:
            described = model.describe_r(r)
        except (TypeError, ValueError) as error:
            raise ValueError(f"r={schedules.r_label(r)} does not fit the model: {error}") from None
        if is_main:
            print(described)
    dataset = data.builder(config.dataset, config.data_dir, download=config.get("download", True))
    check_num_classes(model, dataset, config.dataset)
    count = data.num_examples(dataset, config.split, config.limit)
    if count == 0:
        raise ValueError(f"split {config.split!r} of {config.dataset} has no examples")
    per_process = -(-count // process_count)
    skipped = data.SkippedExamples()

    def make_batches():
        return data.eval_batches(
            dataset, config.split, preprocess, config.batch_size, limit=config.limit, on_skip=skipped,
            process_index=process_index, process_count=process_count,
        )

    timing_images = [jnp.asarray(b["images"]) for _, b in zip(range(3), make_batches())]
    if params is None:
        params = init_params(model)
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
    num_batches = -(-per_process // config.batch_size)
    variables = jax.device_put({"params": params})
    return _Setup(model, variables, make_batches, timing_images, num_batches, meta, skipped, is_main)


def run(config) -> list[dict[str, Any]]:
    """eval.py's job: load, sweep r, print the table, write JSON/CSV/PNG to the workdir
    (after every row, so a failure keeps the finished ones).

    On several processes (`maybe_initialize_distributed`) each evaluates its share
    of the split on its own devices in batches of `batch_size`; top-1 and top-5
    count every example once, images/s and GFLOPs are each process's own, and
    process 0 prints and writes the results. A config with `methods` (see
    configs/compare_methods.py) compares methods at equal FLOPs instead
    (`compare_methods`).
    """
    if config.get("methods"):
        return compare_methods(config)
    # Mistakes in r fail here, before anything loads.
    r_values = schedules.parse_r_values(config.r)
    setup = _setup(config, r_values)
    model = setup.model
    for r, target in budget.config_targets(
        model, setup.variables, config, batch_size=config.batch_size, images=setup.timing_images
    ):
        # A speed-up target is measured on each process: all take process 0's choice.
        r = schedules.parse_r_value(text_of_process_zero(schedules.r_label(r)))
        if setup.is_main:
            print(f"{target}: {model.describe_r(r)}")
        r_values.append(r)
    meta = {**setup.meta, **method_config.described(model.method)}
    rows = sweep(
        model,
        setup.variables,
        r_values,
        setup.make_batches,
        timing_images=setup.timing_images,
        prop_attn=config.prop_attn,
        runs=config.timing_runs,
        num_batches=setup.num_batches,
        on_row=lambda rows: report.write_results(rows, config.workdir, meta) if setup.is_main else None,
    )
    if setup.is_main:
        print(report.format_table(rows))
        if setup.skipped.names:
            names = setup.skipped.names
            print(f"skipped {len(names)} undecodable image(s), counted out: {', '.join(names)}")
        print(f"wrote {config.workdir}/sweep.json, sweep.csv, sweep.png")
    return rows


COMPARE_COLUMNS = ("method", "settings", "budget", "budget_gflops", "r", "top1", "top5", "gflops", "vs_budget", "images_per_s")


def compare_methods(config) -> list[dict[str, Any]]:
    """Every method of `config.methods` at the FLOPs budgets of `config.budget_method`
    at each `config.budget_r`: one row per method and budget.

    A budget is the GFLOPs per image of the budget method at that `r`. Each other
    method gets its own `r`, the schedule `budget.choose_r_near_gflops` picks
    within `config.budget_tolerance` (a share) of the budget; the budget method
    keeps the budget's `r`. Writes compare_methods.json/.csv and a plot of top-1
    against GFLOPs, a line per method, to the workdir.
    """
    names = method_config.compared(config)
    setup = _setup(config)
    prop_attn, batch = config.prop_attn, config.batch_size  # FLOPs counted at the eval batch
    reference = setup.model.clone(reduction=method_config.reduction(config, config.budget_method))
    budgets = [
        (r, budget.gflops_per_image(reference, setup.variables, r, batch_size=batch, prop_attn=prop_attn))
        for r in schedules.parse_r_values(config.budget_r)
    ]
    rows, methods = [], {}
    for name in tqdm(names, desc="methods", unit="method"):
        model = setup.model.clone(reduction=method_config.reduction(config, name))
        methods[name] = model.method.settings
        chosen = []  # per budget: its label and GFLOPs, the r chosen (None: out of reach) and its GFLOPs
        for budget_r, gflops in budgets:
            label = f"{config.budget_method} r={schedules.r_label(budget_r)}"
            choice = (budget_r, gflops) if model.method == reference.method else None
            if choice is None:
                try:
                    picked = budget.choose_r_near_gflops(
                        model, setup.variables, gflops, tolerance=config.budget_tolerance,
                        batch_size=batch, prop_attn=prop_attn,
                    )
                    choice = (picked.r, picked.gflops)
                except ValueError as error:  # even the most reducing schedule costs more
                    print(f"{name} at {label}: {error}")
            chosen.append((label, gflops, choice))
        swept = iter(sweep(
            model,
            setup.variables,
            [choice[0] for _, _, choice in chosen if choice is not None],
            setup.make_batches,
            timing_images=setup.timing_images,
            prop_attn=prop_attn,
            runs=config.timing_runs,
            num_batches=setup.num_batches,
        ))  # fmt: skip
        for label, gflops, choice in chosen:
            row = {"method": name, "settings": method_config.settings_text(model.method), "budget": label,
                   "budget_gflops": gflops}  # fmt: skip
            if choice is None:
                rows.append({**row, "r": "out of reach"})
                continue
            # Against the count the bisection used (the sweep's own is of the compiled program).
            rows.append({**row, "vs_budget": f"{choice[1] / gflops - 1:+.1%}", **next(swept)})
    print(report.format_table(rows, COMPARE_COLUMNS))
    meta = {**setup.meta, "methods": methods}
    report.write_results(rows, config.workdir, meta, stem="compare_methods", plot=report.plot_by_method)
    print(f"wrote {config.workdir}/compare_methods.json, compare_methods.csv, compare_methods.png")
    return rows
