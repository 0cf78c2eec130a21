"""The method a command runs: its settings checked when the config is read, options that
belong to another method refused, and the method named in every table and file."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from tome_jax import reduce, registry
from tome_jax.reduce import diffrate

pytest.importorskip("ml_collections")

from tome_jax import method_config  # noqa: E402
from tome_jax.configs import compare_methods, eval_cifar10  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
NOWHERE = "/nonexistent/tome_jax_test"


@pytest.mark.parametrize(
    "method, settings, message",
    [
        (reduce.ToFu, dict(merge_after=1.5), r"tofu.merge_after=1.5: must be in \[0, 1\]"),
        (reduce.MCTF, dict(tau_info=-5.0), "mctf.tau_info=-5.0: must be >= 0"),
        (reduce.PiToMe, dict(margin=2.0), r"pitome.margin=2.0: must be in \[-1, 1\]"),
        (reduce.PiToMe, dict(bipartite_share=-0.1), r"pitome.bipartite_share=-0.1: must be in \[0, 1\]"),
        (reduce.DTEM, dict(soft_merge="sometimes"), "dtem.soft_merge='sometimes': must be one of 'training'"),
        (reduce.DTEM, dict(tau1=0.0), "dtem.tau1=0.0: must be > 0"),
        (reduce.DiffRate, dict(prune=(1, -2)), r"diffrate.prune=\(1, -2\): each value must be >= 0, got -2"),
        (reduce.DiffRate, dict(prune=(1.5,)), r"diffrate.prune=\(1.5,\): must be a list of ints"),
        (reduce.DiffRateSearch, dict(target_gflops=0.0), "diffrate_search.target_gflops=0.0: must be > 0"),
        (reduce.MCTF, dict(bidirectional=3), "mctf.bidirectional=3: must be True or False"),
        (reduce.ToFu, dict(merge_after="late"), "tofu.merge_after='late': must be a number"),
        (reduce.PiToMe, dict(marign=0.5), "pitome.marign: pitome has no setting marign; its settings: margin"),
    ],
)
def test_settings_out_of_range_or_of_the_wrong_type_are_refused_naming_key_value_and_range(method, settings, message):
    with pytest.raises(ValueError, match=message):
        reduce.check_settings(method, settings)
    with pytest.raises(ValueError, match=message):
        reduce.create(method.name, **settings)


def test_every_method_builds_at_its_defaults_but_a_search_without_target():
    for name, method in reduce.METHODS.items():
        if name == "diffrate_search":
            with pytest.raises(ValueError, match="target_gflops=0.0: must be > 0"):
                method()
        else:
            assert method().settings == reduce.default_settings().get(name, {})
    assert reduce.Valid(low=0, high=1).admits(1) and not reduce.Valid(low=0, open_low=True).admits(0)


def test_the_config_check_refuses_another_methods_settings_and_dtem_options_without_dtem():
    config = eval_cifar10.get_config()
    method_config.check(config)  # every method's defaults, unchanged: nothing to say
    config.method = "pitome"
    config.mctf.tau_info = 10.0
    with pytest.raises(ValueError, match=r"config.mctf.tau_info=10.0 is a setting of mctf, but the run's "
                                         r"config.method is pitome: set --config.method=mctf"):
        method_config.check(config)
    config.method = "mctf"
    method_config.check(config)
    config.mctf.tau_info = -5.0
    with pytest.raises(ValueError, match="config.mctf.tau_info=-5.0: must be >= 0"):
        method_config.check(config)

    config = eval_cifar10.get_config()
    config.metric_layers = "metric_layers.safetensors"
    with pytest.raises(ValueError, match="only DTEM reads, but config.method is tome: set --config.method=dtem"):
        method_config.check(config)
    config.method = "dtem"
    method_config.check(config)
    config.pretrained = False
    with pytest.raises(ValueError, match="config.pretrained=False loads none"):
        method_config.check(config)


def test_a_comparison_takes_the_settings_of_the_methods_it_compares():
    config = compare_methods.get_config()
    method_config.check(config)  # the shipped comparison runs as it is
    config.mctf.tau_info = 10.0
    method_config.check(config)
    config.methods = "tome, pitome"
    with pytest.raises(ValueError, match="is a setting of mctf, but the run's config.methods is tome, pitome"):
        method_config.check(config)
    config.methods = "tome, pitmoe"
    with pytest.raises(ValueError, match="config.methods names pitmoe; known: tome, pitome"):
        method_config.check(config)


def test_per_layer_lists_must_fit_the_depth_and_the_error_says_what_they_would_become():
    model = registry.create_model("vit_tiny_patch4_32", depth=4, reduction=reduce.DiffRate(prune=(1, 2)))
    with pytest.raises(ValueError, match=r"diffrate.prune=\[1, 2\] lists 2 layers but the model has 4: give one "
                                         r"per layer \(padded with zeros: \[1, 2, 0, 0\]\)"):
        model.method.check_depth(model.depth)
    with pytest.raises(ValueError, match=r"padded with zeros: \[1, 2, 0, 0\]"):
        model.init(jax.random.key(0), jax.numpy.zeros((1, 32, 32, 3)), r=2)
    with pytest.raises(ValueError, match=r"lists 5 layers but the model has 4: give one per layer \(cut: \[1, 0, 0, 0\]\)"):
        reduce.DiffRate(prune=(1, 0, 0, 0, 3)).check_depth(4)
    reduce.DiffRate(prune=(1, 0, 0, 0)).check_depth(4)
    reduce.DiffRate().check_depth(4)  # no prune list: nothing pruned anywhere


def test_the_searchs_count_is_multiply_adds_half_of_xlas_flops_that_eval_reports():
    """The DiffRate search's 0.2071 beside eval's 0.42 for one schedule: the authors count a
    multiply-add once (GMACs), XLA twice; norms and softmax make up the last few percent."""
    budget = pytest.importorskip("tome_jax.budget")
    model = registry.create_model("vit_tiny_patch4_32")  # the bundled model's architecture
    found = diffrate.schedule([65] * 3 + [49] * 3 + [33] * 3 + [17] * 3, [65] * 3 + [41] * 3 + [25] * 3 + [9] * 3, 65)
    gmacs = float(diffrate.search_gmacs(model, found.prune_kept, found.merge_kept))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, 32, 32, 3)), r=0))
    xla_gflops = budget.gflops_per_image(model.clone(reduction=reduce.DiffRate(prune=found.prune)), variables, list(found.r))
    assert 1.0 < xla_gflops / (2 * gmacs) < 1.05


def test_a_training_run_records_its_method(tmp_path, capsys):
    train_lib = pytest.importorskip("tome_jax.train_lib")
    from tiny_train_config import get_config

    config = get_config()
    config.method, config.tofu.merge_after = "tofu", 0.25
    train_lib.write_run_record(config, registry.create_model("vit_tiny_patch4_32", reduction=reduce.ToFu(0.25)), tmp_path)
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["method"] == "tofu" and record["settings"] == {"merge_after": 0.25} and record["r"] == "2"
    assert record["config"]["tofu"] == {"merge_after": 0.25}
    assert "method: tofu (merge_after=0.25), r=2" in capsys.readouterr().out


def test_an_eval_run_names_its_method_and_settings_in_the_table_and_files(tmp_path, capsys):
    evaluate = pytest.importorskip("tome_jax.evaluate")
    from tiny_train_config import eval_config

    config = eval_config()
    config.update(method="pitome", r="0, 2", limit=8, batch_size=8, workdir=str(tmp_path))
    config.pitome.margin = 0.6
    evaluate.run(config)
    table = capsys.readouterr().out
    assert "| method | settings | r |" in table
    assert "| pitome | margin=0.6, alpha=1.0, bipartite_share=0.5 | 2 |" in table
    written = json.loads((tmp_path / "sweep.json").read_text())
    assert written["meta"]["method"] == "pitome"
    assert written["meta"]["settings"] == {"margin": 0.6, "alpha": 1.0, "bipartite_share": 0.5}
    assert [row["method"] for row in written["rows"]] == ["pitome", "pitome"]
    lines = (tmp_path / "sweep.csv").read_text().splitlines()
    assert lines[0].startswith("method,settings,r,") and lines[2].startswith('pitome,"margin=0.6, alpha=1.0')


def run_command(command, *args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "tome_jax", command, *args], cwd=REPO, env=env,
                          capture_output=True, text=True)  # fmt: skip


# A model and dataset that do not exist: each mistake is found before either loads.
NOTHING_LOADS = [f"--config.model={NOWHERE}.safetensors", f"--config.dataset=folder:{NOWHERE}"]


@pytest.mark.parametrize(
    "command, args, words",
    [
        ("eval", ["--config.metric_layers=layers.safetensors", *NOTHING_LOADS],
         ["config.metric_layers", "set --config.method=dtem"]),
        ("eval", ["--config.method=pitome", "--config.mctf.tau_info=10", *NOTHING_LOADS],
         ["config.mctf.tau_info=10.0 is a setting of mctf", "--config.method=mctf"]),
        ("eval", ["--config.method=tofu", "--config.tofu.merge_after=1.5", *NOTHING_LOADS],
         ["config.tofu.merge_after=1.5", "[0, 1]"]),
        ("eval", ["--config.method=mctf", "--config.mctf.tau_info=-5", *NOTHING_LOADS], ["config.mctf.tau_info=-5.0", ">= 0"]),
        ("eval", ["--config.method=pitome", "--config.pitome.margin=2.0", *NOTHING_LOADS],
         ["config.pitome.margin=2.0", "[-1, 1]"]),
        # The bundled model loads (the depth is its), the data does not.
        ("eval", ["--config.method=diffrate", "--config.diffrate.prune=(1, 2)", "--config.r=0", f"--config.dataset=folder:{NOWHERE}"],
         ["diffrate.prune=[1, 2] lists 2 layers but the model has 12", "padded with zeros: [1, 2, 0,"]),
        ("eval", ["--config.r=[4, 4]", f"--config.dataset=folder:{NOWHERE}"], ["r=[4, 4] lists 2 layers", "padded with zeros"]),
        ("train", ["--config=tests/tiny_train_config.py", f"--workdir={NOWHERE}", "--config.method=pitome",
                   "--config.tofu.merge_after=0.9", *NOTHING_LOADS], ["config.tofu.merge_after=0.9 is a setting of tofu"]),
        ("train", ["--config=configs/diffrate_search_cifar10.py", f"--workdir={NOWHERE}",
                   "--config.diffrate_search.target_gflops=0", *NOTHING_LOADS],
         ["config.diffrate_search.target_gflops=0.0: must be > 0"]),
    ],
)  # fmt: skip
def test_a_commands_method_mistakes_end_with_one_line_and_status_2(command, args, words):
    done = run_command(command, *args)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, done.stderr[-3000:]
    for word in words:
        assert word in error_lines[0], error_lines[0]
