"""tome_jax beside PyTorch (timm, ToMe) and the FLOP limit of the device, in one run.

    tome-jax-bench --config configs/bench_cpu.py
    tome-jax-bench --config configs/bench_cpu.py --config.models=vit_small_patch16_224 \
        --config.batch_sizes=8,16 --config.r="0, 16, (16, -1)" --config.dtypes=float32,bfloat16
    tome-jax-bench --config configs/bench_cpu.py --device=gpu
    tome-jax-bench --config configs/bench_families.py   # CLIP, SigLIP, DINOv2 towers by timm name
    tome-jax-bench --config configs/bench_media.py      # VideoMAE and AST beside transformers

For every model, batch size and dtype, one interleaved timing loop
(`measure.interleaved_times`) runs, call by call, tome_jax at each `r`, the same
model with every merge replaced by a slice (the merge's share), timm in PyTorch at
r = 0, PyTorch ToMe at each `r` (the official package when `import tome` works and
the project's reference `tome_jax.torch_tome`), and square matmuls in the dtype,
the fastest of which is the reachable peak that `peak_pct` divides by. Both
frameworks run the same random weights (`from_timm` of the timm module). Prints a
table and writes JSON.

A model named `transformers:<class>` (e.g. `transformers:VideoMAEForVideoClassification`)
is that transformers class, built from its config class's defaults with
`config.hf_overrides[<class>]` on top, random weights, nothing downloaded; tome_jax
reads it with `from_hf`. Its PyTorch column (`timm_r0_img_s`) is then the
transformers model at r = 0, and there is no PyTorch ToMe for it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
from typing import Any, Callable, ClassVar, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tome_jax import attention, budget, measure, merge, reduce, registry, report, schedules, vit
from tome_jax.convert import from_hf, from_timm

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Model names that are transformers classes rather than timm names.
TRANSFORMERS_PREFIX = "transformers:"
COLUMNS = (
    "model", "batch", "dtype", "r", "tome_jax_img_s", "official_img_s", "reference_img_s",
    "ratio", "timm_r0_img_s", "gflops", "gflop_s", "peak_gflop_s", "peak_pct", "compile_s", "merge_pct",
)  # fmt: skip


def parse_names(text: str) -> list[str]:
    """"a, b" -> ["a", "b"]; an empty entry is an error."""
    names = [name.strip() for name in str(text).split(",")]
    if not all(names):
        raise ValueError(f"empty entry in {text!r}")
    return names


def parse_ints(text) -> list[int]:
    """"8, 16" (or one int, as ml_collections may pass it) -> [8, 16], each >= 1."""
    values = [int(v) for v in parse_names(text)]
    if min(values) < 1:
        raise ValueError(f"sizes must be >= 1, got {text!r}")
    return values


def matmul_call(dtype, size: int, repeats: int = 1) -> tuple[Callable[[int], Any], float]:
    """A timed call of `repeats` [size, size] @ [size, size] XLA matmuls in `dtype`, and its GFLOPs.

    The repeats are dispatched back to back and waited for once, so a small matmul
    does as much work a call as a large one and dispatch costs do not count.
    """
    a, b = (jax.random.normal(jax.random.key(i), (size, size), dtype) for i in range(2))
    matmul = jax.jit(jnp.matmul).lower(a, b).compile()

    def call(i):
        for _ in range(repeats):
            product = matmul(a, b)
        jax.block_until_ready(product)

    return call, repeats * 2 * size**3 / 1e9


def peak_calls(dtype, sizes: Sequence[int]) -> dict[str, tuple[Callable[[int], Any], float]]:
    """{"matmul N": (timed call, its GFLOPs)}, every size doing about the largest one's work a call."""
    largest = max(sizes)
    return {f"matmul {size}": matmul_call(dtype, size, repeats=round((largest / size) ** 3)) for size in sizes}


def peak_speeds(peaks: dict[str, tuple[Any, float]], times: dict[str, list[float]]) -> dict[str, Any]:
    """The reachable peak: the matmul size with the highest median GFLOP/s in the loop.

    A median, as the models report theirs, so `peak_pct` compares like with like (the
    fastest round of a noisy loop grows with the number of rounds); that size's
    fastest round is kept beside it.
    """
    medians = {name: gflops / statistics.median(times[name]) for name, (_, gflops) in peaks.items()}
    best = max(medians, key=medians.get)
    return {"peak_gflop_s": medians[best], "peak_size": int(best.split()[-1]),
            "peak_fastest_gflop_s": peaks[best][1] / min(times[best])}  # fmt: skip


class TorchSide(NamedTuple):
    """The PyTorch models of one benchmark group, on one device."""

    timm: Any  # timm VisionTransformer (or a transformers model), eval mode
    official: Any | None  # a copy patched by the official ToMe, None where not installed (or not timm)
    call: Callable[[Callable, int], None]  # (forward, i): forward on batch i, synchronised


def torch_device(device: str) -> str | None:
    """The torch device beside JAX's platform; None where torch has none (TPU) or torch and timm
    are not installed (the default config asks for the PyTorch columns: without the torch extra
    the benchmark runs tome_jax's alone)."""
    try:
        import timm  # noqa: F401  (build_models makes the PyTorch side with it)
        import torch
    except ImportError:
        return None

    if device == "gpu":
        return "cuda" if torch.cuda.is_available() else None
    return "cpu" if device == "cpu" else None


def official_tome():
    """The official ToMe package, or None when it is not importable."""
    try:
        import tome
    except ImportError:
        return None
    return tome


def torch_input_axes(model: vit.ViT) -> tuple[int, ...]:
    """The transpose of tome_jax's inputs into PyTorch's: NHWC images to NCHW, videos
    [batch, frames, height, width, channels] to transformers' [batch, frames, channels,
    height, width]; spectrograms [batch, time, mel bins] stay as they are."""
    if model.fbank_input:
        return (0, 1, 2)
    return (0, 3, 1, 2) if model.num_frames is None else (0, 1, 4, 2, 3)


def torch_side(timm_model, images: Sequence[np.ndarray], device: str, dtype: str, axes=(0, 3, 1, 2)) -> TorchSide:
    """Moves `timm_model` (or a transformers model) to `device` and builds its timed call
    (autocast for bfloat16).

    images: tome_jax's input batches, given to torch as copies transposed by `axes`
    (`torch_input_axes`). The official ToMe patches timm models only.
    """
    import torch

    timm_model = timm_model.to(device).eval()
    tome = official_tome()
    official = None
    if tome is not None and not is_transformers(timm_model):
        official = copy.deepcopy(timm_model)
        tome.patch.timm(official)
    tensors = [torch.from_numpy(np.asarray(x).transpose(axes).copy()).to(device) for x in images]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def call(forward, i):
        autocast = (
            torch.autocast(device, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            forward(tensors[i % len(tensors)])
        sync()

    return TorchSide(timm_model, official, call)


def official_forward(model, r):
    """The patched model's forward at `r` (the official code reads `model.r` per call)."""

    def forward(images):
        model.r = r
        return model(images)

    return forward


def is_transformers(model) -> bool:
    """A transformers model (the PyTorch side of a `transformers:` name), not a timm one."""
    return type(model).__module__.startswith("transformers.")


def transformers_model(name: str, config):
    """The transformers class a `transformers:<class>` name gives, from its config class's
    defaults and `config.hf_overrides[<class>]`, random weights, eval mode."""
    import transformers

    class_name = name[len(TRANSFORMERS_PREFIX) :]
    model_class = getattr(transformers, class_name, None)
    if model_class is None or not hasattr(model_class, "config_class"):
        raise ValueError(f"{name}: transformers has no model class {class_name!r}")
    overrides = config.get("hf_overrides", {}).get(class_name, {})
    overrides = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides)
    return model_class(model_class.config_class(**overrides)).eval()


def build_models(name: str, dtype: str, config, device: str):
    """(tome_jax model, variables, timm model or None) with the same random weights; for a
    `transformers:` name the transformers model stands in for timm's."""
    architecture = {k: v for k, v in dict(config.model_overrides).items() if v is not None}  # unset: the model's own
    overrides = dict(dtype=DTYPES[dtype])
    if config.merge_implementation:
        overrides["merge_implementation"] = config.merge_implementation
    if config.attn_implementation:
        overrides["attn_implementation"] = config.attn_implementation
    if name.startswith(TRANSFORMERS_PREFIX):
        torch_model = transformers_model(name, config)
        with tempfile.TemporaryDirectory() as directory:
            torch_model.save_pretrained(directory)
            model, variables = from_hf(directory, **overrides)
        keep = config.torch and torch_device(device) is not None
        return model, jax.device_put(variables), torch_model if keep else None
    if config.torch and torch_device(device) is not None:
        import timm

        timm_model = timm.create_model(name, pretrained=False, **architecture).eval()
        model, variables = from_timm(timm_model, **overrides)
        return model, jax.device_put(variables), timm_model
    model = registry.create_model(name, **architecture, **overrides)
    return model, {"params": vit.init_params(model)}, None


def r_values_for(model, variables, config, batch: int, images) -> tuple[dict, dict]:
    """{label: r} for `config.r` and the config's targets, and {label: [targets that chose it]}."""
    r_values = {schedules.r_label(r): r for r in schedules.parse_r_values(config.r)}
    targets = {}
    for r, target in budget.config_targets(model, variables, config, batch_size=batch, images=images):
        r_values.setdefault(schedules.r_label(r), r)
        targets.setdefault(schedules.r_label(r), []).append(target)
    return r_values, targets


@dataclasses.dataclass(frozen=True)
class KeepFirstTokens(reduce.Reduction):
    """A reduction with a merge's shapes and none of its work: the first
    `tokens - r` tokens stay. Timed beside the merging model, it gives the merge's share."""

    tracks_sources: ClassVar[bool] = False

    def __call__(self, step: reduce.Step) -> reduce.Reduced:
        batch, tokens = step.size.shape
        kept = tokens - step.r
        # The plan of the slice, for per-token fields (a rotary model's positions) to follow.
        order = jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32), (batch, tokens))
        plan = merge.MergePlan(
            dest=jnp.where(order < kept, order, merge.DROPPED), kept=order[:, :kept], merged=order[:, :0]
        )
        return reduce.Reduced(step.x[:, :kept], step.size[:, :kept], plan)


def tome_jax_calls(model, variables, r_values: dict, images) -> tuple[dict, dict]:
    """Timed calls of tome_jax at each r, and of the sliced model where r merges; {label: costs}."""
    sliced = model.clone(reduction=KeepFirstTokens())
    calls, costs = {}, {}
    for label, r in r_values.items():
        predict, cost = measure.compile_predict(model, r, variables, images[0])
        calls[f"tome_jax {label}"] = measure.jax_call(predict, variables, images)
        schedule = model.effective_schedule(r)
        if any(schedule):
            sliced_predict, _ = measure.compile_predict(sliced, r, variables, images[0])
            calls[f"slice {label}"] = measure.jax_call(sliced_predict, variables, images)
        costs[label] = dict(schedule=list(schedule), **cost)
    return calls, costs


def pytorch_calls(side: TorchSide, r_values: dict) -> dict:
    """Timed calls of timm at r = 0 and of PyTorch ToMe (reference, official) at each r."""
    from tome_jax import torch_tome

    calls = {"timm": lambda i: side.call(side.timm, i)}
    if is_transformers(side.timm):  # PyTorch ToMe patches timm models only
        return calls
    for label, r in r_values.items():
        reference = lambda x, r=r: torch_tome.tome_forward(side.timm, x, r)  # noqa: E731
        calls[f"reference {label}"] = lambda i, f=reference: side.call(f, i)
        if side.official is not None:
            calls[f"official {label}"] = lambda i, f=official_forward(side.official, r): side.call(f, i)
    return calls


def bench_group(name: str, batch: int, dtype: str, config, device: str) -> list[dict[str, Any]]:
    """One model at one batch size and dtype: a row per r, every call in one interleaved loop."""
    model, variables, timm_model = build_models(name, dtype, config, device)
    images = [
        np.asarray(jax.random.normal(jax.random.key(i), (batch, *model.input_shape)))
        for i in range(config.input_batches)
    ]
    jax_images = [jax.device_put(x) for x in images]
    r_values, targets = r_values_for(model, variables, config, batch, jax_images)
    calls, costs = tome_jax_calls(model, variables, r_values, jax_images)
    if timm_model is not None:
        side = torch_side(timm_model, images, torch_device(device), dtype, torch_input_axes(model))
        calls.update(pytorch_calls(side, r_values))
    # The peak runs inside the same loop, as on a shared machine it moves with the load.
    matmuls = peak_calls(DTYPES[dtype], parse_ints(config.peak_sizes))
    calls.update({name: call for name, (call, _) in matmuls.items()})
    times = measure.interleaved_times(calls, rounds=config.runs, warmup=config.warmup)
    peaks = peak_speeds(matmuls, times)
    images_per_s = {key: batch / statistics.median(values) for key, values in times.items() if key not in matmuls}
    return [
        {"model": name, "batch": batch, "dtype": dtype, "r": label, "target": targets.get(label),
         **costs[label], **peaks, **row_speeds(label, costs[label]["gflops"], images_per_s, peaks["peak_gflop_s"])}
        for label in r_values
    ]  # fmt: skip


def row_speeds(label: str, gflops: float, images_per_s: dict[str, float], peak: float) -> dict[str, Any]:
    """The measured columns of the row of `label` from every call's images/s."""
    speed = images_per_s[f"tome_jax {label}"]
    official, reference = images_per_s.get(f"official {label}"), images_per_s.get(f"reference {label}")
    pytorch = official or reference
    sliced = images_per_s.get(f"slice {label}")
    return {
        "tome_jax_img_s": speed,
        "official_img_s": official,
        "reference_img_s": reference,
        "ratio": speed / pytorch if pytorch else None,
        "ratio_to": None if pytorch is None else ("official" if official else "reference"),
        "timm_r0_img_s": images_per_s.get("timm"),
        "slice_img_s": sliced,
        # The share of the forward's time that merging (plan and weighted sums) takes.
        "merge_pct": 100 * (1 - speed / sliced) if sliced else None,
        "gflop_s": gflops * speed,
        "peak_pct": 100 * gflops * speed / peak,
    }


def select_platform(device: str) -> None:
    """Points JAX at `device` ('cpu', 'gpu' or 'tpu'); must run before any JAX work."""
    if device not in ("cpu", "gpu", "tpu"):
        raise ValueError(f"device must be cpu, gpu or tpu, got {device!r}")
    jax.config.update("jax_platforms", device)
    try:
        jax.devices()
    except RuntimeError:  # JAX's message names the last backend it tried ('rocm' for a gpu), not the device
        raise ValueError(
            f"JAX finds no {device} on this machine: run with --device=cpu, or install the JAX "
            f"build for the {device} (e.g. pip install 'jax[cuda12]')"
        ) from None


def run(config, device: str = "cpu") -> dict[str, Any]:
    """The whole benchmark: every model x batch x dtype group in turn; writes config.out."""
    dtypes = parse_names(config.dtypes)
    unknown = set(dtypes) - set(DTYPES)
    if unknown:
        raise ValueError(f"unknown dtypes {sorted(unknown)}; expected {', '.join(DTYPES)}")
    threads = config.threads or os.cpu_count()
    torch_version = None
    if config.torch and torch_device(device) is not None:
        import torch

        torch.set_num_threads(threads)
        torch_version = torch.__version__
    rows = []
    for name in parse_names(config.models):
        for batch in parse_ints(config.batch_sizes):
            for dtype in dtypes:
                group = bench_group(name, batch, dtype, config, device)
                print(report.format_table(group, COLUMNS), flush=True)
                rows += group
    meta = {
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": threads if torch_version else None,
        "jax": jax.__version__,
        "torch": torch_version,
        "official_tome": official_tome() is not None if torch_version else False,
        "merge_implementation": config.merge_implementation or merge.default_merge_implementation(),
        "attention_implementation": config.attn_implementation or attention.default_implementation(),
        "runs": config.runs,
        "input_batches": config.input_batches,
    }
    print(report.format_table(rows, COLUMNS))
    print(f"merge: {meta['merge_implementation']}, attention: {meta['attention_implementation']}")
    result = {"meta": meta, "rows": rows}
    if config.out:
        out = pathlib.Path(config.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
    return result


if __name__ == "__main__":  # the benchmark's spelling before it became a command
    print("error: the benchmark is now the command tome-jax-bench (or python -m tome_jax bench)", file=sys.stderr)
    sys.exit(2)
