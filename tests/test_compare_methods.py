"""configs/compare_methods.py through eval.py's job: methods at equal FLOPs, on a tiny
random ViT and a few bundled CIFAR-10 images."""

import json

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("matplotlib")

from tome_jax import budget, evaluate, reduce, schedules  # noqa: E402
from tome_jax.configs import compare_methods  # noqa: E402
from tiny_train_config import TINY  # noqa: E402


def tiny_config(workdir):
    config = compare_methods.get_config()
    config.model = "vit_tiny_patch4_32"
    config.pretrained = False
    config.model_overrides = {**TINY, "depth": 3, "patch_size": 4}  # 64 patches
    # The budget method, one before attention, one with no sources; ToMe's r = 2 and (6, -1).
    config.methods = "tome, mctf, dct"
    config.budget_r = "2, (6, -1)"
    config.limit = 8
    config.batch_size = 4
    config.timing_runs = 1
    config.workdir = str(workdir)
    return config


@pytest.mark.slow
def test_each_method_lands_at_each_budget_and_the_files_are_written(tmp_path):
    config = tiny_config(tmp_path)
    rows = evaluate.run(config)

    assert [(row["method"], row["budget"]) for row in rows] == [
        (method, f"tome r={r}") for method in ("tome", "mctf", "dct") for r in ("2", "(6, -1)")
    ]
    model, _, _ = evaluate.load_model(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *model.input_shape)))
    tome_rows = [row for row in rows if row["method"] == "tome"]
    assert [row["r"] for row in tome_rows] == ["2", "(6, -1)"]  # the budget method keeps its r
    for tome_row in tome_rows:
        budget_gflops = tome_row["budget_gflops"]
        assert tome_row["vs_budget"] == "+0.0%"
        for row in rows:
            if row["budget"] != tome_row["budget"] or row["method"] == "tome":
                continue
            method = model.clone(reduction=reduce.create(row["method"]))
            choose = lambda: budget.choose_r_near_gflops(method, shapes, budget_gflops, tolerance=0.03, batch_size=4)  # noqa: E731
            if row["r"] == "out of reach":
                with pytest.raises(ValueError, match="out of reach"):
                    choose()
                continue
            assert float(row["vs_budget"].rstrip("%")) <= 3.0, row
            if row["budget"] != "tome r=2":
                continue  # the bisection again, once per method, is enough to check the table by
            # The r in the table is the one the shared bisection picks for this budget.
            want = choose()
            assert row["r"] == schedules.r_label(want.r)
            assert row["vs_budget"] == f"{want.gflops / budget_gflops - 1:+.1%}"
            assert want.gflops <= budget_gflops * 1.03
        assert 0 <= tome_row["top1"] <= 1 and tome_row["count"] == 8

    written = json.loads((tmp_path / "compare_methods.json").read_text())
    assert [row["method"] for row in written["rows"]] == [row["method"] for row in rows]
    assert written["meta"]["methods"]["mctf"] == reduce.MCTF().settings  # each method with its settings
    assert (tmp_path / "compare_methods.csv").read_text().startswith("method,settings,budget,")
    assert (tmp_path / "compare_methods.png").stat().st_size > 0


def test_unknown_methods_say_which_exist(tmp_path):
    config = tiny_config(tmp_path)
    config.methods = "tome, dtme"
    with pytest.raises(ValueError, match="config.methods names dtme; known: tome, pitome"):
        evaluate.run(config)
