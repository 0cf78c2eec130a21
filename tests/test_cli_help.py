"""The command line as a new user meets it: --help that teaches, and every mistake one line.

Each case runs the command as a subprocess from the repository root, as the README
spells it, and nothing in it downloads.
"""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
# The commands' own defaults for TensorFlow's logging apply (see tome_jax.cli._run).
ENV = {
    **{k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")},
    "HF_HUB_OFFLINE": "1",
}
PYTHON = sys.executable

HELP = {
    "eval": [PYTHON, "-m", "tome_jax", "eval", "--help"],
    "eval.py": [PYTHON, "eval.py", "--help"],
    "train": [PYTHON, "-m", "tome_jax", "train", "-h"],
    "train.py": [PYTHON, "train.py", "--helpfull"],
    "bench": [PYTHON, "-m", "tome_jax", "bench", "--help"],
    "vis": [PYTHON, "-m", "tome_jax", "vis", "--help"],
}


def run(args, env=ENV) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def helps() -> dict[str, subprocess.CompletedProcess]:
    """Every command's --help, run side by side."""
    started = {name: subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for name, args in HELP.items()}  # fmt: skip
    done = {}
    for name, process in started.items():
        out, err = process.communicate(timeout=300)
        done[name] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return done


@pytest.mark.parametrize("name", list(HELP))
def test_help_exits_0_and_teaches(helps, name):
    done = helps[name]
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "pip install 'tome_jax[" in done.stdout  # the extra it needs
    # The keys with their defaults and meanings, and each method's settings with theirs.
    if name.startswith(("eval", "train")):
        assert "--config.r='" in done.stdout and "--config.batch_size=" in done.stdout
        assert "--config.pitome.margin=0.75\n      the first layer's margin" in done.stdout
    if name == "eval":
        assert "--config.limit=None\n      first N examples only" in done.stdout
    if name.startswith("train"):
        assert "--workdir=None\n      Checkpoints" in done.stdout
        assert "--config.r='(8, -1)'\n      the merge schedule while training" in done.stdout
    if name == "train.py":  # --helpfull: absl's flags after the config's
        assert "absl's flags" in done.stdout and "--verbosity" in done.stdout
    if name == "bench":
        assert "--device=cpu" in done.stdout and "--config.runs=10\n      timed rounds" in done.stdout
    if name == "vis":
        assert "--method" in done.stdout and "--method=mctf --setting tau_info=20.0" in done.stdout


def test_every_shipped_config_key_and_method_setting_has_a_meaning():
    import dataclasses
    import importlib

    from tome_jax import config_help, reduce

    for path in sorted((REPO / "tome_jax" / "configs").glob("[a-z]*.py")):
        config = importlib.import_module(f"tome_jax.configs.{path.stem}").get_config()
        meanings = config_help.config_meanings(path)
        assert [key for key in config if key not in reduce.METHODS and not meanings.get(key)] == [], path.name
    for method in reduce.METHODS.values():
        meanings = config_help.setting_meanings(method)
        assert [field.name for field in dataclasses.fields(method) if not meanings.get(field.name)] == [], method


def test_python_m_tome_jax_lists_the_commands():
    done = run([PYTHON, "-m", "tome_jax", "--help"])
    assert done.returncode == 0 and all(f"  {command}" in done.stdout for command in ("eval", "train", "bench", "vis"))
    done = run([PYTHON, "-m", "tome_jax"])
    assert done.returncode == 2 and "usage: python -m tome_jax" in done.stderr


def test_an_override_shows_in_help_and_the_bench_takes_every_vit_attribute():
    done = run([PYTHON, "-m", "tome_jax", "bench", "--config.model_overrides.depth=1", "--help"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Set: depth=1." in done.stdout


def assert_one_error_line(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr[-3000:]
    for word in words:
        assert word in errors[0], errors[0]


EVAL = [PYTHON, "eval.py", "--config.limit=2", "--config.batch_size=2"]
TINY_BENCH = [PYTHON, "-m", "tome_jax", "bench", "--config=tests/tiny_bench_config.py"]


@pytest.mark.parametrize(
    "args, words",
    [
        # A misspelt registry name (random weights): the close names.
        ([*EVAL, "--config.model=vit_smal_patch16_224", "--config.pretrained=False"],
         ["unknown model 'vit_smal_patch16_224'", "did you mean vit_small_patch16_224"]),
        ([PYTHON, "-m", "tome_jax", "vis", "out.png", "--model=vit_smal_patch16_224", "--random-weights"],
         ["did you mean vit_small_patch16_224"]),
        # An unknown key after --config FILE (ml_collections raises it while absl parses).
        ([*TINY_BENCH, "--config.model_overrides.dept=2"], ["--config.model_overrides.dept", 'did you mean "depth"']),
        ([PYTHON, "eval.py", "--config=configs/eval_cifar10.py", "--config.bach_size=2"], ['did you mean "batch_size"']),
        ([*EVAL, "--config=configs/eval_cifar10.py"], ["--config.limit=2 in argv before a value for --config"]),
        ([*EVAL, "--confg.r=0"], ["Unknown command line flag 'confg.r'", "--help lists the flags"]),
        ([*EVAL, "stray"], ["unexpected arguments ['stray']"]),
        ([PYTHON, "train.py", "--config=tests/tiny_train_config.py"], ["--workdir=DIR is required"]),
        # vis: the picture's format, the method and its settings, before anything loads.
        ([PYTHON, "-m", "tome_jax", "vis", "out.txt"], ["suffix '.txt'", ".png, .jpg or .webp"]),
        ([PYTHON, "-m", "tome_jax", "vis", "out.png", "--method=pitome", "--setting", "margn=0.5"],
         ["pitome has no setting margn", "margin"]),
        ([PYTHON, "-m", "tome_jax", "vis", "out.png", "--method=dct"], ["DCT mixes tokens"]),
        # The old module entry points say where the command went.
        ([PYTHON, "-m", "tome_jax.vis", "out.png"], ["tome-jax-vis"]),
        ([PYTHON, "-m", "tome_jax.bench"], ["tome-jax-bench"]),
        # A core-only install: the extra to install.
        ([PYTHON, "-c", "import sys; sys.modules['ml_collections'] = None; from tome_jax import cli; "
                        "sys.argv = ['tome-jax-eval']; cli.eval_main()"],
         ["no module 'ml_collections'", "pip install 'tome_jax[eval]'"]),
    ],
    ids=["eval-name", "vis-name", "bench-override", "eval-key-after-config", "eval-overrides-before-config",
         "eval-unknown-flag", "eval-positional", "train-workdir",
         "vis-suffix", "vis-setting", "vis-dct", "old-vis", "old-bench", "core-only"],
)  # fmt: skip
def test_a_mistake_is_one_line_and_exit_2(tmp_path, args, words):
    assert_one_error_line(run([str(tmp_path / arg) if arg.startswith("out.") else arg for arg in args]), *words)
    assert list(tmp_path.iterdir()) == []  # no picture


def test_a_misspelt_timm_name_with_weights_gives_close_names():
    pytest.importorskip("timm")
    done = run([*EVAL, "--config.model=vit_base_patch16_224.augreg_in21k_ft_in1kk"])
    assert_one_error_line(done, "neither a checkpoint file nor a timm model name",
                          "did you mean vit_base_patch16_224.augreg_in21k_ft_in1k")  # fmt: skip


def test_bench_on_a_device_jax_lacks_names_the_fix():
    import jax

    if any(device.platform == "gpu" for device in jax.devices()):
        pytest.skip("this machine has a GPU")
    assert_one_error_line(run([*TINY_BENCH, "--device=gpu"]), "JAX finds no gpu", "--device=cpu")


def test_tensorflow_start_up_lines_are_silenced_unless_the_user_asks():
    """eval starts TensorFlow (the data) before it finds no such split."""
    args = [*EVAL, "--config.split=nosuch", "--config.r=0"]
    quiet = run(args)
    assert_one_error_line(quiet, "split 'nosuch' not in")
    assert "oneDNN" not in quiet.stderr
    asked = run(args, env={**ENV, "TF_ENABLE_ONEDNN_OPTS": "1", "TF_CPP_MIN_LOG_LEVEL": "0"})
    assert "oneDNN custom operations are on" in asked.stderr
