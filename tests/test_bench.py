"""The benchmark command end to end on a tiny model, its timing loop, and choose_r."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

import tome_jax
from tome_jax import bench, budget, measure, merge, schedules
from test_vit import SMALL

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_command_writes_every_column(tmp_path):
    pytest.importorskip("timm", reason="the PyTorch columns need the torch extra: pip install -e '.[torch]'")
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "tome_jax", "bench", "--config", "tests/tiny_bench_config.py",
         f"--config.out={out}", "--config.target_gflops=0.006", "--device=cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [row["r"] for row in rows] == ["0", "1"]  # the target chose r = 1: marked, not repeated
    assert rows[1]["target"] == ["target_gflops=0.006"] and rows[0]["target"] is None
    for row in rows:
        assert set(bench.COLUMNS) <= set(row)
        for key in ("tome_jax_img_s", "reference_img_s", "timm_r0_img_s", "gflops", "gflop_s", "peak_fastest_gflop_s", "compile_s"):
            assert row[key] > 0, key
        assert row["peak_pct"] == pytest.approx(100 * row["gflop_s"] / row["peak_gflop_s"])
        assert row["peak_fastest_gflop_s"] >= row["peak_gflop_s"] and row["peak_size"] in (32, 64)
    assert rows[0]["merge_pct"] is None and rows[1]["merge_pct"] is not None
    assert rows[1]["gflops"] < 0.006 < rows[0]["gflops"]
    meta = report["meta"]
    assert meta["merge_implementation"] == merge.default_merge_implementation("cpu")
    assert meta["attention_implementation"] == "einsum"
    assert "| tome_jax_img_s |" in result.stdout and "merge: " in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("full", ["bench_families", "bench_rotary"])
def test_family_rows_put_each_tower_beside_timm_and_the_reference(full):
    """The CLIP, SigLIP and DINOv2 group (configs/bench_families.py) and the rotary one
    (configs/bench_rotary.py: DINOv3, EVA02), tiny: one block at 32 px."""
    pytest.importorskip("timm", reason="the PyTorch columns need the torch extra: pip install -e '.[torch]'")
    import importlib

    import tiny_bench_families_config

    config = tiny_bench_families_config.get_config()
    config.models = importlib.import_module(f"tome_jax.configs.{full}").get_config().models
    rows = bench.run(config)["rows"]
    models = [name.strip() for name in config.models.split(",")]
    assert [(row["model"], row["r"]) for row in rows] == [(m, r) for m in models for r in ("0", "1")]
    for row in rows:
        for key in ("tome_jax_img_s", "reference_img_s", "timm_r0_img_s", "gflops"):
            assert row[key] > 0, (row["model"], key)
    # Each has a prefix token or none and a few patches: r = 1 merges one.
    assert [row["schedule"] for row in rows] == [[0], [1]] * len(models)
    gflops = {(row["model"], row["r"]): row["gflops"] for row in rows}
    assert all(gflops[m, "1"] < gflops[m, "0"] for m in models)


def test_library_imports_without_torch_and_the_benchmark_runs_without_it():
    code = (
        "import sys, tome_jax, tome_jax.bench; assert 'torch' not in sys.modules, 'torch imported'; "
        "sys.modules['torch'] = sys.modules['timm'] = None; "  # not installed: tome_jax's columns alone
        "assert tome_jax.bench.torch_device('cpu') is None"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_interleaved_times_alternate_calls_and_skip_warmup():
    order = []
    calls = {name: (lambda i, name=name: order.append((name, i))) for name in "abc"}
    times = measure.interleaved_times(calls, rounds=3, warmup=1)
    assert order == [("a", 0), ("b", 0), ("c", 0), ("c", 1), ("b", 1), ("a", 1),
                     ("a", 2), ("b", 2), ("c", 2), ("c", 3), ("b", 3), ("a", 3)]  # fmt: skip
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3, "c": 3}
    with pytest.raises(ValueError, match="need rounds >= 1"):
        measure.interleaved_times(calls, rounds=0)


@pytest.fixture(scope="module")
def small_model():
    # 17 tokens, 2 blocks: a per-layer schedule of two must not read as (r, inflection).
    model = tome_jax.ViT(**{**SMALL, "depth": 2})
    return model, jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


def exhaustive_fewest_merges(model, variables, target, inflections=(0.0, -1.0)):
    """Every (r, inflection) up to the most merging one: the fewest merged tokens within target."""
    gflops = {}
    best = None
    for inflection in inflections:
        for r in range(schedules.most_merging_r(model.num_tokens, model.depth, inflection) + 1):
            schedule = schedules.effective_schedule(
                model.num_tokens, schedules.parse_r(model.depth, (r, inflection)), model.num_prefix_tokens
            )
            if schedule not in gflops:
                gflops[schedule] = budget.gflops_per_image(model, variables, list(schedule), batch_size=2)
            if gflops[schedule] <= target and (best is None or sum(schedule) < best):
                best = sum(schedule)
    return best


def test_peak_is_the_matmul_size_with_the_best_median():
    peaks = bench.peak_calls(jnp.float32, [16, 32])
    assert {name: round(gflops * 1e9) for name, (_, gflops) in peaks.items()} == {
        "matmul 16": 8 * 2 * 16**3, "matmul 32": 2 * 32**3}  # same work a call
    gflops = peaks["matmul 32"][1]
    # 16 has the fastest single round, 32 the better median: the median decides.
    times = {"matmul 16": [1.0, 1.0, 0.1], "matmul 32": [0.5, 0.5, 0.4]}
    assert bench.peak_speeds(peaks, times) == {
        "peak_gflop_s": pytest.approx(gflops / 0.5), "peak_size": 32,
        "peak_fastest_gflop_s": pytest.approx(gflops / 0.4)}
    peaks["matmul 16"][0](0)  # the calls run


def test_choose_r_meets_a_gflops_target_with_the_fewest_merges(small_model):
    model, variables = small_model
    full = budget.gflops_per_image(model, variables, 0, batch_size=2)
    for fraction in (0.8, 0.6):
        target = fraction * full
        choice = budget.choose_r(model, variables, target_gflops=target, batch_size=2)
        assert choice.gflops <= target and choice.speedup is None
        assert choice.merged_tokens == exhaustive_fewest_merges(model, variables, target)
        assert choice.schedule == schedules.effective_schedule(
            model.num_tokens, schedules.parse_r(model.depth, choice.r), model.num_prefix_tokens
        )
    assert budget.choose_r(model, variables, target_gflops=full, batch_size=2).r == 0


def test_choose_r_errors_name_the_problem(small_model):
    model, variables = small_model
    with pytest.raises(ValueError, match=r"1e-06 GFLOPs per image is out of reach at batch 16: .* with inflection -1"):
        budget.choose_r(model, variables, target_gflops=1e-6)
    with pytest.raises(ValueError, match="exactly one of target_gflops and target_speedup"):
        budget.choose_r(model, variables)
    with pytest.raises(ValueError, match="exactly one of"):
        budget.choose_r(model, variables, target_gflops=1.0, target_speedup=2.0)


def test_choose_r_for_a_speedup_times_the_schedules():
    model = tome_jax.ViT(**{**SMALL, "img_size": 8, "depth": 1})  # 5 tokens: few schedules to time
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    choice = budget.choose_r(
        model, variables, target_speedup=1e-6, batch_size=2, timing_runs=1, inflections=(0.0,)
    )
    assert choice.r == 0 and choice.speedup == 1.0  # r = 0 meets any target up to 1


def test_config_targets_read_the_eval_config(small_model):
    from configs import eval_cifar10

    model, variables = small_model
    config = eval_cifar10.get_config()
    assert budget.config_targets(model, variables, config, batch_size=2) == []
    config.target_gflops = 0.7 * budget.gflops_per_image(model, variables, 0, batch_size=2)
    [(r, note)] = budget.config_targets(model, variables, config, batch_size=2)
    assert note == f"target_gflops={config.target_gflops}"
    assert budget.gflops_per_image(model, variables, r, batch_size=2) <= config.target_gflops
    assert budget.config_targets(model, variables, ml_collections.ConfigDict(), batch_size=2) == []
