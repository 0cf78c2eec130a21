"""Accuracy, throughput and FLOPs of a ViT at each `r`, shared by eval.py and train.py."""

from __future__ import annotations

import ast
import csv
import json
import pathlib
import statistics
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from tome_jax import merge
from tome_jax.vit import ViT

# (variables, images [batch, h, w, 3]) -> logits [batch, classes]
PredictFn = Callable[[Any, jax.Array], jax.Array]


def r_label(r: merge.RSpec) -> str:
    """A stable printable name for an r spec: `4`, `(8, -1)`, `[4, 4, 2]`."""
    return repr(list(r)) if isinstance(r, (list, tuple)) and not _is_pair(r) else repr(r)


def _is_pair(r) -> bool:
    return isinstance(r, tuple) and len(r) == 2


def parse_r_values(text: str) -> list[merge.RSpec]:
    """"0, 4, (8, -1), [4, 4, 2]" -> [0, 4, (8, -1), [4, 4, 2]] (one entry per sweep row)."""
    try:
        values = ast.literal_eval(f"[{text}]")
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"cannot parse r values {text!r}: {e}") from None
    for value in values:
        if not isinstance(value, (int, tuple, list)) or isinstance(value, bool):
            raise ValueError(f"r value {value!r} in {text!r} is not an int, (r, inflection) or list")
    return values


def parse_r_value(text: str) -> merge.RSpec:
    """One r spec from text: "13", "(8, -1)" or "[4, 4, 2]" (for config strings)."""
    values = parse_r_values(text)
    if len(values) != 1:
        raise ValueError(f"expected one r spec, got {len(values)} in {text!r}")
    return values[0]


def compile_predict(
    model: ViT, r: merge.RSpec, variables, images: jax.Array, *, prop_attn: bool = True
) -> tuple[PredictFn, dict[str, float]]:
    """Compiles `(variables, images) -> logits` at a fixed `r` for `images`' shape.

    Returns the compiled function and its compile time and GFLOPs per image (XLA's
    cost analysis), so accuracy and timing run exactly the program that was costed.
    """
    predict = jax.jit(lambda v, x: model.apply(v, x, r=r, prop_attn=prop_attn))
    start = time.perf_counter()
    compiled = predict.lower(variables, images).compile()
    seconds = time.perf_counter() - start
    return compiled, {"gflops": gflops_of(compiled, images.shape[0]), "compile_s": seconds}


def gflops_of(stage, batch_size: int) -> float:
    """GFLOPs per image from XLA's cost analysis of a lowered or compiled program."""
    analysis = stage.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return analysis["flops"] / batch_size / 1e9


@jax.jit
def _correct_counts(logits, labels, mask):
    """Top-1 and top-5 hits over the valid rows of one batch."""
    k = min(5, logits.shape[-1])
    top = jax.lax.top_k(logits, k)[1]
    hits = top == labels[:, None]
    return jnp.stack([(hits[:, 0] & mask).sum(), (hits.any(-1) & mask).sum(), mask.sum()])


def accuracy(
    predict: PredictFn,
    variables,
    batches: Iterable[dict[str, np.ndarray]],
    *,
    progress: str | None = None,
    total: int | None = None,
    put: Callable[[dict], dict] | None = None,
) -> dict[str, float]:
    """Top-1/top-5 over padded batches (`images`, `labels`, `mask`, see data.py).

    `put` turns a host batch into the arrays `predict` expects (e.g. global arrays
    split over a device mesh); counts stay on device until the end.
    """
    counts = jnp.zeros(3, jnp.int32)
    for batch in tqdm(batches, desc=progress, total=total, disable=progress is None, leave=False):
        batch = put(batch) if put else batch
        logits = predict(variables, batch["images"])
        counts = counts + _correct_counts(logits, batch["labels"], batch["mask"])
    top1, top5, count = (int(c) for c in jax.device_get(counts))
    if count == 0:
        raise ValueError("no examples were evaluated")
    return {"top1": top1 / count, "top5": top5 / count, "count": count}


def interleaved_times(
    calls: Mapping[str, Callable[[int], Any]], *, rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds of each timed call, alternating the entries call by call.

    The one timing loop of the project, for every framework: `calls[name](i)` runs
    call `i` to completion (blocking on its result; `i` picks the input batch).
    Each round runs every entry once, in reverse order every other round, so
    load that drifts over the run hits all entries alike; `warmup` rounds first
    are not recorded.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1 and warmup >= 0, got {rounds} and {warmup}")
    times = {name: [] for name in calls}
    names = list(calls)
    for i in range(warmup + rounds):
        for name in names if i % 2 == 0 else reversed(names):
            start = time.perf_counter()
            calls[name](i)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def jax_call(predict: PredictFn, variables, images: Sequence[jax.Array]) -> Callable[[int], Any]:
    """Call `i` of `predict`, blocking, on batch `i` of `images` (rotated)."""
    return lambda i: jax.block_until_ready(predict(variables, images[i % len(images)]))


def throughput(
    predict: PredictFn,
    variables,
    images: Sequence[jax.Array],
    *,
    runs: int = 5,
    warmup: int = 1,
) -> dict[str, float]:
    """Images/s of a compiled `predict`: median over `runs` timed calls after `warmup`.

    `images` holds a few batches that the runs rotate through, so no result can be
    served from a cache of the same input.
    """
    times = interleaved_times({"predict": jax_call(predict, variables, images)}, rounds=runs, warmup=warmup)
    median = statistics.median(times["predict"])
    return {"images_per_s": images[0].shape[0] / median, "batch_time_s": median}


def sweep(
    model: ViT,
    variables,
    r_values: Sequence[merge.RSpec],
    make_batches: Callable[[], Iterable[dict[str, np.ndarray]]],
    *,
    timing_images: Sequence[jax.Array],
    prop_attn: bool = True,
    runs: int = 5,
    num_batches: int | None = None,
) -> list[dict[str, Any]]:
    """One row per r: accuracy, images/s, GFLOPs per image, tokens left at the head.

    `make_batches()` yields eval batches of the same shape as `timing_images[i]`.
    """
    rows = []
    for r in tqdm(r_values, desc="r sweep", unit="r"):
        predict, cost = compile_predict(model, r, variables, timing_images[0], prop_attn=prop_attn)
        schedule = merge.parse_r(model.depth, r)
        tokens = merge.tokens_per_layer(model.num_tokens, schedule, model.num_prefix_tokens)
        row = {"r": r_label(r), "schedule": list(merge.effective_schedule(
            model.num_tokens, schedule, model.num_prefix_tokens)), "tokens_left": tokens[-1]}
        row.update(cost)
        row.update(accuracy(predict, variables, make_batches(), progress=f"r={row['r']}", total=num_batches))
        row.update(throughput(predict, variables, timing_images, runs=runs))
        rows.append(row)
    baseline = next((row for row in rows if row["tokens_left"] == model.num_tokens), None)
    for row in rows:
        row["speedup"] = row["images_per_s"] / baseline["images_per_s"] if baseline else None
    return rows


COLUMNS = ("r", "top1", "top5", "images_per_s", "speedup", "gflops", "tokens_left", "compile_s")


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    """A Markdown table of `columns` (accuracy in %, speed-ups and ratios as `1.23x`)."""
    def cell(key, value):
        if value is None:
            return "-"
        if key in ("top1", "top5"):
            return f"{100 * value:.2f}"
        if key in ("speedup", "ratio"):
            return f"{value:.2f}x"
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(k, row.get(k)) for k in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(rows: Sequence[dict[str, Any]], out_dir: str | pathlib.Path, meta: dict) -> None:
    """sweep.json (rows + meta), sweep.csv and sweep.png (top-1 vs images/s)."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"meta": meta, "rows": list(rows)}, indent=1))
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_tradeoff(rows, out / "sweep.png", title=meta.get("title", ""))


def plot_tradeoff(rows: Sequence[dict[str, Any]], path: pathlib.Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xs = [row["images_per_s"] for row in rows]
    ys = [100 * row["top1"] for row in rows]
    ax.plot(xs, ys, "o", color="tab:blue")
    for row, x, y in zip(rows, xs, ys):
        ax.annotate(f"r={row['r']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("images / s")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


REPO = pathlib.Path(__file__).resolve().parent.parent


def resolve_source(source: str) -> str:
    """A checkpoint path relative to the working directory or the repository, else as is."""
    for candidate in (pathlib.Path(source), REPO / source):
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
    from tome_jax.vit import create_model

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
        from tome_jax.convert import from_timm

        metric_layers = config.get("metric_layers") or None
        model, variables = from_timm(source, metric_layers=metric_layers, **overrides)
        params = variables["params"]
    if config.get("params_from"):
        params = trained_params(config.params_from, config.get("params_step", "best"), model)
    return model, params, source


def trained_params(workdir: str, step, model: ViT):
    """Parameters from a train.py workdir's checkpoint, checked against `model`."""
    from flax import traverse_util

    from tome_jax.train_lib import Checkpoints

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
    from tome_jax import data

    size = model.image_hw
    if config.preprocess == "timm":
        from tome_jax.convert import pretrained_data_config

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


def run(config) -> list[dict[str, Any]]:
    """eval.py's job: load, sweep r, print the table, write JSON/CSV/PNG to the workdir."""
    from tome_jax import data

    r_values = parse_r_values(config.r)
    model, params, source = load_model(config)
    dataset = data.builder(config.dataset, config.data_dir)
    preprocess = preprocess_for(config, model, source)
    available = data.num_examples(dataset, config.split)
    count = min(available, config.limit) if config.limit else available
    num_batches = -(-count // config.batch_size)

    def make_batches():
        return data.eval_batches(dataset, config.split, preprocess, config.batch_size, limit=config.limit)

    timing_images = [jnp.asarray(b["images"]) for _, b in zip(range(3), make_batches())]
    if params is None:
        params = model.init(jax.random.key(0), timing_images[0][:1])["params"]
    variables = jax.device_put({"params": params})
    from tome_jax import budget  # it builds on this module

    for r, target in budget.config_targets(
        model, variables, config, batch_size=config.batch_size, images=timing_images
    ):
        print(f"{target}: r = {r_label(r)}")
        r_values.append(r)
    rows = sweep(
        model,
        variables,
        r_values,
        make_batches,
        timing_images=timing_images,
        prop_attn=config.prop_attn,
        runs=config.timing_runs,
        num_batches=num_batches,
    )
    meta = {
        "model": config.model,
        "dataset": config.dataset,
        "split": config.split,
        "examples": count,
        "batch_size": config.batch_size,
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "title": f"{pathlib.Path(config.model).name} on {config.dataset}/{config.split} ({count} images)",
    }
    print(format_table(rows))
    write_results(rows, config.workdir, meta)
    print(f"wrote {config.workdir}/sweep.json, sweep.csv, sweep.png")
    return rows
