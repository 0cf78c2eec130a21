"""Runs that meet damage: corrupt checkpoints, resumed metrics, diverging training; several processes."""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_train import REPO, build, committed_steps, config_args, losses, run_train, tiny_config
from tome_jax import checkpoints, data, divergence, evaluate, metrics_log, sharding, train_lib
from tome_jax.data import augment

NO_META = {"best_top1": None, "best_step": None}


@pytest.fixture(scope="module")
def tiny_state():
    """The tiny model's training state on one device (faster to save than on eight)."""
    state, shardings, _ = build(tiny_config("unused"), sharding.make_mesh(1, jax.devices()[:1]), total_steps=10)
    return state, shardings


def save_steps(directory, state, steps=(4, 8)) -> None:
    """Checkpoints of `state` at `steps`, parameters shifted by the step."""
    saver = checkpoints.Checkpoints(directory, async_save=False)
    for step in steps:
        params = jax.tree_util.tree_map(lambda p, shift=step: p + shift, state.params)
        saver.save(state.replace(step=jnp.asarray(step, jnp.int32), params=params), NO_META)
    saver.close()


def largest_file(step_dir: pathlib.Path) -> pathlib.Path:
    """The biggest file of a step: array data (orbax's OCDBT chunks)."""
    return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def zero(path: pathlib.Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


DAMAGE = {
    "truncated data file": lambda step: truncate(largest_file(step)),
    "missing data file": lambda step: largest_file(step).unlink(),
    "zeroed _METADATA": lambda step: zero(step / "state" / "_METADATA"),
    "missing meta": lambda step: (step / "meta" / "metadata").unlink(),
}


def test_a_relative_checkpoint_directory_saves_and_restores(tmp_path, monkeypatch, tiny_state):
    """`--workdir runs/x` is relative; orbax refuses relative paths at its first async save."""
    state, shardings = tiny_state
    monkeypatch.chdir(tmp_path)
    saver = checkpoints.Checkpoints("runs/relative/checkpoints", async_save=True)
    saver.save(state.replace(step=jnp.asarray(3, jnp.int32)), NO_META)
    saver.wait()
    assert saver.latest_step() == 3
    restored, _ = saver.restore(3, state, shardings)
    saver.close()
    assert int(restored.step) == 3


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, capsys, tiny_state, damage):
    like, shardings = tiny_state
    save_steps(tmp_path, like)
    DAMAGE[damage](tmp_path / "8")
    saved = checkpoints.Checkpoints(tmp_path)
    state, meta = saved.restore_latest(like, shardings)
    assert int(state.step) == 4 and meta == NO_META
    for got, start in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(like.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(start) + 4)
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and warning.startswith(f"warning: skipping checkpoint {tmp_path / '8'}"), warning
    assert f"moved it to {tmp_path / '8.corrupt'}" in warning
    # The damaged step is out of orbax's way: the resumed run saves step 8 again.
    assert sorted(os.listdir(tmp_path)) == ["4", "8.corrupt"]
    saved.save(state.replace(step=jnp.asarray(8, jnp.int32)), NO_META)
    saved.wait()
    assert sorted(os.listdir(tmp_path)) == ["4", "8", "8.corrupt"]


def test_read_errors_name_the_file_and_say_what_failed(tmp_path, tiny_state):
    like, shardings = tiny_state
    save_steps(tmp_path, like, steps=(4,))
    zero(tmp_path / "4" / "state" / "_METADATA")
    with pytest.raises(checkpoints.CheckpointError) as error:
        checkpoints.Checkpoints(tmp_path).restore(4, like, shardings)
    assert str(error.value) == (
        f"{tmp_path / '4' / 'state'}: metadata does not read "
        "(JSONDecodeError: Expecting value: line 1 column 1 (char 0))"
    )


def test_when_no_checkpoint_reads_the_error_lists_them_all_and_moves_none(tmp_path, tiny_state):
    like, shardings = tiny_state
    save_steps(tmp_path, like)
    for step in ("4", "8"):
        truncate(largest_file(tmp_path / step))
    with pytest.raises(checkpoints.CheckpointError, match="no checkpoint in .* reads back") as error:
        checkpoints.Checkpoints(tmp_path).restore_latest(like, shardings)
    assert f"{tmp_path / '8' / 'state'}: " in str(error.value) and f"{tmp_path / '4' / 'state'}: " in str(error.value)
    assert sorted(os.listdir(tmp_path)) == ["4", "8"]


def test_a_checkpoint_of_another_model_is_an_error_not_a_fallback(tmp_path, tiny_state):
    state, shardings = tiny_state
    save_steps(tmp_path, state)
    eleven_classes = {"bias": jnp.zeros(11), "kernel": jnp.zeros((32, 11))}
    other = state.replace(params={**state.params, "head": eleven_classes})
    with pytest.raises(checkpoints.CheckpointMismatchError, match=r"params.head.bias: saved float32\[10\] vs now float32\[11\]"):
        checkpoints.Checkpoints(tmp_path).restore_latest(other, shardings)
    assert sorted(os.listdir(tmp_path)) == ["4", "8"]


def test_metrics_past_the_restored_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "train/loss": 1.0 / s} for s in range(1, 7)] + [{"step": 4, "eval/top1": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "train/lo')  # cut by a kill
    metrics_log.drop_metrics_after(path, 4)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == [r for r in rows if r["step"] <= 4]
    metrics_log.drop_metrics_after(tmp_path / "absent.jsonl", 4)  # a fresh run has none

def test_non_finite_numbers_are_found_in_metrics_and_in_the_state():
    divergence.check_finite_metrics({"loss": np.float32(2.3), "grad_norm": np.float32(1.0)}, 7, 5)
    with pytest.raises(divergence.NonFiniteError, match=r"^step 7: loss 2.3, gradient norm inf \(checked every log_every=5"):
        divergence.check_finite_metrics({"loss": np.float32(2.3), "grad_norm": np.float32(np.inf)}, 7, 5)
    state = {"count": jnp.zeros((), jnp.int32), "mu": [jnp.ones(3), jnp.ones((2, 2), jnp.bfloat16)]}
    assert bool(divergence.all_finite(state))
    for bad in (np.nan, np.inf, -np.inf):
        assert not bool(divergence.all_finite({**state, "mu": [jnp.ones(3), jnp.ones((2, 2)).at[1, 0].set(bad)]}))


@pytest.mark.slow
@pytest.mark.parametrize(
    "log_every, message",
    [
        (1, r"^step 3: loss nan, gradient norm nan \(checked every log_every=1 steps\); training stopped\."),
        # Not logged at the step it diverged: the check before the save stops it.
        (1000, r"^step 3: the parameters or optimizer state hold NaN or infinity"),
    ],
)
def test_training_stops_on_non_finite_numbers_and_never_saves_them(small_cifar, tmp_path, log_every, message):
    # Warmup gives step 1 a learning rate of 0 and step 2 one of 5e37: parameters
    # near 1e38 make step 3's logits overflow.
    config = tiny_config(f"folder:{small_cifar}", learning_rate=1e38, log_every=log_every, checkpoint_every=1)
    with pytest.raises(divergence.NonFiniteError, match=message) as error:
        train_lib.train_and_evaluate(config, str(tmp_path))
    assert "\n" not in str(error.value)
    saved = checkpoints.Checkpoints(tmp_path / "checkpoints")
    assert saved.manager.all_steps() == [1, 2]
    like, shardings, _ = build(config, sharding.make_mesh(1), total_steps=config.num_steps)
    for step in (1, 2):
        state, _ = saved.restore(step, like, shardings)
        assert bool(divergence.all_finite((state.params, state.opt_state)))


@pytest.mark.slow
def test_train_py_reports_divergence_in_one_line(small_cifar, tmp_path):
    proc = run_train(tmp_path, config_args(f"folder:{small_cifar}", learning_rate=1e38))
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 1, out
    assert out.splitlines()[-1].startswith("error: step 3: loss nan, gradient norm nan"), out


# ---------------------------------------------------------------- several processes


def test_the_rows_of_each_process_make_up_the_one_process_batches(small_cifar):
    dataset = data.builder(f"folder:{small_cifar}")
    augmentation = augment.TrainAugment(size=(32, 32), mean=data.CIFAR10_MEAN, std=data.CIFAR10_STD)
    # 240 images make 15 batches of 16 an epoch: steps 14-16 cross into the second epoch.
    def batches(rows):
        stream = data.train_batches(dataset, "train", augmentation, 16, seed=3, start_step=14, rows=rows)
        return [next(stream) for _ in range(3)]

    whole = batches(None)
    halves = zip(batches((0, 6)), batches((6, 16)))
    for one, (first, second) in zip(whole, halves, strict=True):
        for key in ("images", "labels"):
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), one[key])
    with pytest.raises(ValueError, match=r"rows \(8, 17\) are not a part of a global batch of 16"):
        batches((8, 17))


def test_each_example_is_evaluated_on_exactly_one_process(small_cifar):
    dataset = data.builder(f"folder:{small_cifar}")
    preprocess = data.Preprocess(size=(32, 32), mean=data.CIFAR10_MEAN, std=data.CIFAR10_STD)

    def labels(process_index, process_count):
        batches = list(data.eval_batches(
            dataset, "test", preprocess, 8, limit=27, process_index=process_index, process_count=process_count
        ))  # fmt: skip
        return len(batches), np.concatenate([b["labels"][b["mask"]] for b in batches])

    count, everything = labels(0, 1)
    assert (count, len(everything)) == (4, 27)
    shares = [labels(i, 3) for i in range(3)]  # 9 examples each: 2 batches, the second mostly padding
    assert [n for n, _ in shares] == [2, 2, 2]
    np.testing.assert_array_equal(np.concatenate([share for _, share in shares]), everything)


def test_distributed_keys_are_passed_to_jax_distributed(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    for variable in evaluate.CLUSTER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    config = tiny_config("unused")
    evaluate.maybe_initialize_distributed(config)  # "auto", one process: nothing to join
    config.update({"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1})
    evaluate.maybe_initialize_distributed(config)
    assert calls == [{"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}]
    monkeypatch.setenv("SLURM_NTASKS", "4")
    evaluate.maybe_initialize_distributed(tiny_config("unused"))  # JAX reads SLURM's variables itself
    assert calls[-1] == {}
    config.distributed = "off"
    with pytest.raises(ValueError, match="config.distributed='off' but coordinator_address, num_processes, process_id"):
        evaluate.maybe_initialize_distributed(config)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_processes(script: str, args: list[str], count: int, devices: int) -> list[subprocess.Popen]:
    """`script` as `count` processes of `devices` CPU devices each, joined through
    jax.distributed on a free local port (CPU collectives through gloo)."""
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
    }
    join = [f"--config.coordinator_address=127.0.0.1:{free_port()}", f"--config.num_processes={count}"]
    return [
        subprocess.Popen(
            [sys.executable, str(REPO / script), *args, *join, f"--config.process_id={i}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(count)
    ]  # fmt: skip


def finish_processes(procs: list[subprocess.Popen], status: int = 0, before=None) -> list[str]:
    """The outputs of `procs` once `before()` (if given) returned and all ended, each with `status`."""
    try:
        if before is not None:
            before()
        outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    finally:  # one that failed leaves the others waiting for it
        for proc in procs:
            proc.kill()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == status, out
    return outputs


def run_processes(script: str, args: list[str], count: int, devices: int) -> list[str]:
    """`start_processes`, and their outputs once all ended with status 0."""
    return finish_processes(start_processes(script, args, count, devices))


@pytest.mark.slow
def test_two_processes_train_resume_and_evaluate_as_one_does(small_cifar, tmp_path):
    dataset = f"folder:{small_cifar}"
    steps = {"num_steps": 20, "checkpoint_every": 10, "eval_every": 1000}
    two, one = tmp_path / "two", tmp_path / "one"
    # Two processes of 2 devices, the global batch of 16 split 8 and 8.
    run_processes("train.py", [f"--workdir={two}", *config_args(dataset, **steps)], count=2, devices=2)
    # One process, in this one, on its 8 devices.
    reference = train_lib.train_and_evaluate(tiny_config(dataset, **steps), str(one))
    want = losses(one)
    assert sorted(want) == list(range(1, 21))
    np.testing.assert_allclose([losses(two)[s] for s in want], list(want.values()), rtol=0, atol=1e-5)

    # Stopped after step 10's checkpoint: the two processes resume from it.
    shutil.rmtree(two / "checkpoints" / "20")
    out = run_processes("train.py", [f"--workdir={two}", *config_args(dataset, **steps)], count=2, devices=2)[0]
    assert "resumed from step 10" in out, out
    got = losses(two)  # each step once
    np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=0, atol=1e-5)
    evaluated = [json.loads(line) for line in open(two / "metrics.jsonl") if "eval/top1" in line]
    assert [(r["step"], r["eval/top1"]) for r in evaluated] == [(20, reference["top1"])]

    # eval.py: each process evaluates its share of the test split; the counts add up.
    eval_args = [
        f"--config={REPO / 'tests' / 'tiny_train_config.py'}:eval", f"--config.dataset={dataset}",
        f"--config.params_from={two}", "--config.params_step=latest", f"--config.workdir={tmp_path / 'eval'}",
    ]  # fmt: skip
    run_processes("eval.py", eval_args, count=2, devices=2)
    (row,) = json.loads((tmp_path / "eval" / "sweep.json").read_text())["rows"]
    # What one process's training evaluated at its last step.
    assert (row["top1"], row["top5"], row["count"]) == (reference["top1"], reference["top5"], 80)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_saves_the_same_step_on_both_and_exits(small_cifar, tmp_path):
    workdir = tmp_path / "two"
    steps = {"num_steps": 1000, "checkpoint_every": 1000, "eval_every": 1000}
    args = [f"--workdir={workdir}", *config_args(f"folder:{small_cifar}", **steps)]
    procs = start_processes("train.py", args, count=2, devices=2)

    def preempt_process_1():  # not the coordinator: JAX's preemption service names the step for both
        deadline = time.time() + 600
        while not (workdir / "metrics.jsonl").exists() or len(losses(workdir)) < 3:
            assert all(proc.poll() is None for proc in procs) and time.time() < deadline
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)

    outputs = finish_processes(procs, status=143, before=preempt_process_1)
    last_step = max(losses(workdir))
    assert committed_steps(workdir) == [last_step]
    assert f"preempted: saved step {last_step}, exiting" in outputs[0], outputs[0]
