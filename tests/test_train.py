"""Training: sharding invariance, checkpoint resume after SIGKILL, SIGTERM, learning."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_train_config
from tome_jax import checkpoints, evaluate, reduce, sharding, step_times, train_lib
from tome_jax.configs import train_mctf_cifar10

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = tiny_train_config.TINY


def tiny_config(dataset: str, **changes):
    config = tiny_train_config.get_config()
    config.dataset = dataset
    config.update(changes)
    return config


def build(config, mesh, total_steps):
    """Model, optimizer, sharded state and train step for `config` on `mesh`."""
    model, _, tx, schedule = train_lib.build_model_and_optimizer(config, total_steps)
    state, shardings = train_lib.create_state(model, tx, mesh, rng=jax.random.key(0))
    return state, shardings, train_lib.make_train_step(model, tx, schedule, config, mesh, shardings)


def one_step_loss(mesh, config, batch):
    state, _, step = build(config, mesh, total_steps=10)
    state, metrics = step(state, sharding.global_batch(batch, mesh), jax.random.key(1))
    state, metrics2 = step(state, sharding.global_batch(batch, mesh), jax.random.key(1))
    return float(metrics["loss"]), float(metrics2["loss"]), jax.device_get(state.params)


@pytest.mark.slow
def test_loss_is_the_same_on_1_device_8_devices_and_a_4x2_fsdp_mesh():
    assert jax.device_count() == 8, "conftest asks for 8 host devices"
    config = tiny_config("bundled_cifar10", mixup_alpha=0.8, cutmix_alpha=1.0)
    config.model_overrides = {**TINY, "width": 64, "drop_path_rate": 0.1}
    rng = np.random.default_rng(0)
    batch = {
        "images": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
        "labels": rng.integers(0, 10, 16).astype(np.int32),
    }
    meshes = {
        "1 device": sharding.make_mesh(1, devices=jax.devices()[:1]),
        "8 data": sharding.make_mesh(1),
        "4 data x 2 fsdp": sharding.make_mesh(2),
    }
    results = {name: one_step_loss(mesh, config, batch) for name, mesh in meshes.items()}
    sharded = sharding.shardings_for(results["1 device"][2], meshes["4 data x 2 fsdp"])
    assert any(s.spec != () for s in jax.tree_util.tree_leaves(sharded)), "fsdp split nothing"
    first, second, params = results["1 device"]
    for name, (loss1, loss2, other) in results.items():
        assert abs(loss1 - first) < 1e-5, name
        assert abs(loss2 - second) < 1e-5, name  # the update agrees too
        chex.assert_trees_all_close(other, params, rtol=1e-7, atol=1e-5, custom_message=name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_few_steps_with_merging_lower_the_loss(dtype):
    config = tiny_config("bundled_cifar10", r="3", learning_rate=3e-3, label_smoothing=0.0)
    config.model_overrides = {**TINY, "dtype": dtype}  # bfloat16: compute only
    mesh = sharding.make_mesh(1)
    state, _, step = build(config, mesh, total_steps=30)
    rng = np.random.default_rng(1)
    batch = sharding.global_batch(
        {"images": rng.normal(size=(16, 32, 32, 3)).astype(np.float32), "labels": np.arange(16, dtype=np.int32) % 10},
        mesh,
    )
    losses = []
    for _ in range(30):
        state, metrics = step(state, batch, jax.random.key(2))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(state.params)} == {jnp.dtype("float32")}


@pytest.mark.slow
def test_step_times_are_compared_side_by_side(small_cifar):
    config = tiny_config(f"folder:{small_cifar}")
    rows = step_times.compare_step_times(config, ["0", "(4, -1)"], rounds=2)
    assert [row["r"] for row in rows] == ["0", "(4, -1)"]
    assert rows[0]["speedup"] == 1.0
    for row in rows:
        assert row["step_time_s"] > 0 and row["images_per_s"] == pytest.approx(16 / row["step_time_s"])


def run_train(workdir, config_args, **popen):
    cmd = [sys.executable, str(REPO / "train.py"), f"--workdir={workdir}", *config_args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def config_args(dataset, **changes):
    """Command-line overrides giving train.py the tiny config."""
    args = [
        f"--config={REPO / 'tests' / 'tiny_train_config.py'}",
        f"--config.dataset={dataset}",
    ]
    return args + [f"--config.{k}={v}" for k, v in changes.items()]


def losses(workdir) -> dict[int, float]:
    """Train loss per step, each step logged once (a resumed run drops the rows
    its checkpoint does not hold before it logs those steps again)."""
    records = [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]
    steps = [r["step"] for r in records if "train/loss" in r]
    assert len(steps) == len(set(steps)), f"steps logged twice: {sorted(s for s in set(steps) if steps.count(s) > 1)}"
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def committed_steps(workdir) -> list[int]:
    path = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.exists() else []


def final_params(workdir):
    """The latest checkpoint's step and parameters."""
    config = tiny_config("unused")
    like, shardings, _ = build(config, sharding.make_mesh(1), config.num_steps)
    saved = checkpoints.Checkpoints(pathlib.Path(workdir) / "checkpoints", async_save=False)
    step = saved.latest_step()
    state, _ = saved.restore(step, like, shardings)
    return step, jax.device_get(state.params)


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(small_cifar, tmp_path):
    dataset = f"folder:{small_cifar}"
    # Three times the first checkpoint's step, so the kill lands mid-run; saves and
    # evaluations (each a data pipeline) are what a tiny model's run spends its time on.
    steps, schedule = 30, {"checkpoint_every": 10, "eval_every": 20}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = run_train(straight, config_args(dataset, num_steps=steps, **schedule))
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out

    proc = run_train(killed, config_args(dataset, num_steps=steps, **schedule))
    deadline = time.time() + 600
    while not committed_steps(killed):  # SIGKILL as soon as a checkpoint is committed
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resume_step = max(committed_steps(killed))
    assert resume_step <= max(losses(killed)) < steps, "the kill must land before the end"
    proc = run_train(killed, config_args(dataset, num_steps=steps, **schedule))
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0 and f"resumed from step {resume_step}" in out, out

    want, got = losses(straight), losses(killed)
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-6)
    (step_a, params_a), (step_b, params_b) = final_params(straight), final_params(killed)
    assert step_a == step_b == steps
    chex.assert_trees_all_close(params_b, params_a, rtol=1e-6, atol=1e-7)

    # eval.py's --config.params_from reads the same parameters, on one device.
    model, _, _ = evaluate.load_model(tiny_config("unused"))
    restored = evaluate.trained_params(str(straight), "latest", model)
    chex.assert_trees_all_equal(restored, params_a)
    dtem_model, _, _ = evaluate.load_model(tiny_config("unused", method="dtem"))
    with pytest.raises(ValueError, match="trained no DTEM metric layers"):
        evaluate.trained_params(str(straight), "best", dtem_model)


@pytest.mark.slow
def test_sigterm_saves_the_step_it_was_at_exits_at_once_and_resumes(small_cifar, tmp_path):
    workdir, dataset = tmp_path / "preempted", f"folder:{small_cifar}"
    # One device, as train.py gets on a CPU: on several, a process's first save also
    # compiles orbax's slicing of each array over the replicas (seconds, once).
    one_device = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = run_train(
        workdir, config_args(dataset, num_steps=1000, checkpoint_every=1000, eval_every=1000), env=one_device
    )
    deadline = time.time() + 600
    while not (workdir / "metrics.jsonl").exists() or len(losses(workdir)) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.05)
    start = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    seconds = time.perf_counter() - start
    print(f"SIGTERM to exit: {seconds:.2f} s")  # docs/benchmarks.md's figure (pytest -s)
    assert proc.returncode == 143, out
    # The tiny model's step takes milliseconds: what remains is the save and the exit.
    # Before exit_now, tearing down tf.data alone took 26-42 s. Generous for a loaded machine.
    assert seconds < 15, f"{seconds:.1f} s from SIGTERM to exit"
    last_step = max(losses(workdir))
    assert committed_steps(workdir) == [last_step], (committed_steps(workdir), last_step)
    assert f"preempted: saved step {last_step}" in out

    proc = run_train(workdir, config_args(dataset, num_steps=last_step + 2, eval_every=1000), env=one_device)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0 and f"resumed from step {last_step}" in out, out
    assert sorted(losses(workdir)) == list(range(1, last_step + 3))


def test_train_config_selects_the_reduction_method():
    config = tiny_train_config.get_config()
    assert config.method == "tome" and "mctf" in config and "diffrate" in config
    config.method, config.mctf.tau_info = "mctf", 10.0
    model, *_ = train_lib.build_model_and_optimizer(config, total_steps=2)
    assert model.reduction == reduce.MCTF(tau_info=10.0)


@pytest.mark.slow
def test_mctf_recipe_trains_a_few_steps(small_cifar, tmp_path):
    recipe = train_mctf_cifar10.get_config()
    config = tiny_config(f"folder:{small_cifar}", num_steps=3, eval_every=3, eval_limit=16, train_limit=48)
    for key in ("method", "mctf", "rand_augment_layers", "random_erasing", "weight_decay", "grad_clip"):
        config[key] = recipe[key]
    config.model_overrides["drop_path_rate"] = recipe.model_overrides.drop_path_rate
    config.r, config.eval_r = "[0, 4]", "[0, 4]"
    result = train_lib.train_and_evaluate(config, str(tmp_path))
    assert 0 <= result["top1"] <= 100
    losses = [json.loads(line)["train/loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert len(losses) == 3 and np.all(np.isfinite(losses))
