"""Train-step times at several r, measured side by side (`train.py --step_time_r`)."""

from __future__ import annotations

import statistics
import time

import jax

from tome_jax import data, method_config
from tome_jax.sharding import global_batch, make_mesh
from tome_jax.train_lib import build_model_and_optimizer, create_state, make_train_step


def compare_step_times(config, r_values: list, rounds: int = 10) -> list[dict[str, float]]:
    """Train-step time at each r, measured side by side: every round times one step
    of each r in turn (same batch, each r training its own copy of the state), so
    load drift hits all alike; medians over rounds after one warm-up round.

    Returns one row per r with the `method` and its `settings`, `r`, `step_time_s`,
    `images_per_s` and `speedup` over the first r.
    """
    mesh = make_mesh(config.fsdp)
    model, params, tx, schedule = build_model_and_optimizer(config, total_steps=rounds + 1)
    dataset = data.builder(config.dataset, config.data_dir, download=config.get("download", True))
    augmentation = data.TrainAugment.from_config(config, model.image_hw)
    batch = next(data.train_batches(
        dataset, config.train_split, augmentation, config.batch_size,
        seed=config.seed, limit=config.train_limit, shuffle_buffer=config.shuffle_buffer,
    ))
    batch = global_batch(batch, mesh)
    rng = jax.random.key(config.seed)
    runs = []
    for r in r_values:
        state, shardings = create_state(model, tx, mesh, rng=rng, params=params)
        step = make_train_step(model, tx, schedule, _with_r(config, r), mesh, shardings)
        runs.append({"r": r, "step": step, "state": state, "times": []})
    for round_index in range(rounds + 1):
        for run in runs:
            start = time.perf_counter()
            run["state"], metrics = run["step"](run["state"], batch, rng)
            jax.block_until_ready(metrics)
            if round_index:  # round 0 compiles and warms up
                run["times"].append(time.perf_counter() - start)
    rows = []
    for run in runs:
        median = statistics.median(run["times"])
        rows.append({
            "method": model.method.name, "settings": method_config.settings_text(model.method), "r": run["r"],
            "step_time_s": median, "images_per_s": config.batch_size / median,
        })  # fmt: skip
    for row in rows:
        row["speedup"] = rows[0]["step_time_s"] / row["step_time_s"]
    return rows


def _with_r(config, r: str):
    changed = config.copy_and_resolve_references()
    changed.r = r
    return changed
