"""Runs that survive bad input: undecodable images, both folder layouts, TFDS
download, r checked before anything loads, one-line mistakes, non-finite logits."""

import io
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import tome_jax
from tome_jax import cli, data, evaluate, report, schedules
from tome_jax.configs import eval_cifar10
from tome_jax.data import augment

REPO = pathlib.Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "fox")
PER_CLASS = 3
SIZE = 8


def pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def write_images(directory: pathlib.Path, first_seed: int, per_class: int = PER_CLASS) -> dict[str, np.ndarray]:
    """PNGs (lossless, so every decoder agrees with PIL) of random pixels, by path."""
    written = {}
    for label, name in enumerate(CLASSES):
        (directory / name).mkdir(parents=True)
        for i in range(per_class):
            path = directory / name / f"{i}.png"
            Image.fromarray(pixels(first_seed + 10 * label + i)).save(path)
            written[str(path)] = (pixels(first_seed + 10 * label + i), label)
    return written


def write_bad_images(directory: pathlib.Path) -> list[str]:
    """A truncated JPEG, an empty file and random bytes named like an image."""
    jpeg = io.BytesIO()
    Image.fromarray(pixels(99)).save(jpeg, "JPEG")
    bad = {
        directory / "cat" / "truncated.jpg": jpeg.getvalue()[:200],
        directory / "dog" / "empty.jpg": b"",
        directory / "fox" / "noise.png": np.random.default_rng(0).bytes(300),
    }
    for path, content in bad.items():
        path.write_bytes(content)
    return sorted(str(path) for path in bad)


@pytest.fixture
def folder(tmp_path):
    """root/<split>/<class>/<image>: clean "train", and "test" with three bad files."""
    train = write_images(tmp_path / "train", 0)
    test = write_images(tmp_path / "test", 100)
    return tmp_path, train, test, write_bad_images(tmp_path / "test")


PLAIN = data.Preprocess(size=(SIZE, SIZE), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


# ---------------------------------------------------------------- 1. bad data


def test_evaluation_counts_undecodable_images_out_and_names_them(folder):
    root, _, test, bad = folder
    skipped = []
    batches = list(data.eval_batches(data.builder(f"folder:{root}"), "test", PLAIN, 4, on_skip=skipped.extend))
    assert len(batches) == 3  # 12 files in batches of 4: the count is the files', bad ones padded
    assert sorted(skipped) == bad
    images = np.concatenate([b["images"][b["mask"]] for b in batches])
    labels = np.concatenate([b["labels"][b["mask"]] for b in batches])
    assert len(images) == len(test) == 9
    # Every kept row is one good file, decoded as PIL decodes it, with its label.
    expected = {(pixels.tobytes(), label) for pixels, label in test.values()}
    got = {(np.round(image * 255).astype(np.uint8).tobytes(), label) for image, label in zip(images, labels)}
    assert got == expected


def test_training_replaces_undecodable_images_in_their_batch_and_resumes_the_same(folder):
    root, _, test, bad = folder
    dataset = data.builder(f"folder:{root}")
    augmentation = augment.TrainAugment(  # the identity: rows are the files' pixels
        size=(SIZE, SIZE), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop="padded", padding=0, hflip=False,
        rand_augment_layers=0, erasing_prob=0.0,
    )

    def batches(start_step, count, skipped):
        it = data.train_batches(dataset, "test", augmentation, 4, seed=1, start_step=start_step, on_skip=skipped.extend)
        return [next(it) for _ in range(count)]

    skipped = []
    run = batches(0, 6, skipped)  # two epochs of three steps
    assert sorted(set(skipped)) == bad and len(skipped) == 2 * len(bad)
    good = {pixels.tobytes() for pixels, _ in test.values()}
    for batch in run:
        assert batch["images"].shape == (4, SIZE, SIZE, 3)
        rows = {np.round(image * 255).astype(np.uint8).tobytes() for image in batch["images"]}
        assert rows <= good  # a bad file's row holds another example of the batch
    resumed = batches(4, 2, [])
    for a, b in zip(run[4:], resumed):
        np.testing.assert_array_equal(a["images"], b["images"])
        np.testing.assert_array_equal(a["labels"], b["labels"])


def test_a_folder_lists_as_tfds_image_folder_does(folder):
    """The same order and labels as tfds.ImageFolder, the reference for this layout."""
    import tensorflow_datasets as tfds

    root, *_ = folder
    ours = data.builder(f"folder:{root}")
    reference = tfds.ImageFolder(str(root))
    assert list(ours.class_names) == reference.info.features["label"].names
    for split in ("train", "test"):
        ds = reference.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
        expected = [(ex["image/filename"].decode(), int(ex["label"])) for ex in ds.as_numpy_iterator()]
        assert list(ours.splits[split]) == expected


def test_a_folder_of_class_folders_is_the_one_split_all(tmp_path):
    written = write_images(tmp_path / "flat", 0)
    dataset = data.builder(f"folder:{tmp_path / 'flat'}")
    assert data.split_names(dataset) == ["all"] and list(dataset.class_names) == list(CLASSES)
    assert {path: label for path, label in dataset.splits["all"]} == {p: l for p, (_, l) in written.items()}
    with pytest.raises(ValueError, match=r"split 'test' not in .* it has \['all'\]"):
        data.num_examples(dataset, "test")
    (tmp_path / "flat" / "nested" / "inner").mkdir(parents=True)
    with pytest.raises(ValueError, match="mixes layouts: nested/ holds folders"):
        data.builder(f"folder:{tmp_path / 'flat'}")


def test_a_dataset_whose_classes_do_not_fit_the_head_is_an_error(folder):
    root, *_ = folder
    model = tome_jax.ViT(img_size=SIZE, patch_size=4, width=16, depth=1, num_heads=2, num_classes=10)
    with pytest.raises(ValueError, match=r"has 3 classes but the model's head has 10 outputs"):
        evaluate.check_num_classes(model, data.builder(f"folder:{root}"), "my_data")


def test_a_missing_tfds_dataset_is_prepared_and_a_corrupt_record_is_named(tmp_path):
    """A local TFDS builder (nothing from the network), one of its records not an image."""
    import tensorflow_datasets as tfds

    class TinyNoisyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {"image": tfds.features.Image(shape=(None, None, 3)), "label": tfds.features.ClassLabel(num_classes=3)}
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {"test": self._generate_examples()}

        def _generate_examples(self):
            for i in range(5):
                png = io.BytesIO()
                Image.fromarray(pixels(i)).save(png, "PNG")
                yield i, {"image": io.BytesIO(png.getvalue() if i != 3 else b"no image"), "label": i % 3}

    with pytest.raises(FileNotFoundError, match="not prepared in .* download=True"):
        data.builder("tiny_noisy_images", str(tmp_path), download=False)
    dataset = data.builder("tiny_noisy_images", str(tmp_path))
    assert dataset.is_prepared() and data.num_examples(dataset, "test") == 5
    skipped = []
    (batch,) = data.eval_batches(dataset, "test", PLAIN, 8, on_skip=skipped.extend)
    assert batch["mask"].sum() == 4
    # The name is the record's tfds_id (file and index): that record is the corrupt one.
    records = dataset.as_dataset(
        split="test", decoders={"image": tfds.decode.SkipDecoding()}, read_config=tfds.ReadConfig(add_tfds_id=True)
    )
    named = {ex["tfds_id"].decode(): ex["image"] for ex in records.as_numpy_iterator()}
    assert len(skipped) == 1 and named[skipped[0]] == b"no image"


def tiny_eval_config(root, workdir, **changes):
    config = eval_cifar10.get_config()
    config.model = "vit_tiny_patch4_32"
    config.pretrained = False
    config.model_overrides = dict(width=16, depth=2, num_heads=2, patch_size=4, img_size=SIZE, num_classes=3)
    config.dataset = f"folder:{root}"
    config.batch_size = 4
    config.timing_runs = 1
    config.workdir = str(workdir)
    config.update(changes)
    return config


def test_eval_writes_the_names_of_skipped_images_to_sweep_json(folder, tmp_path):
    root, _, _, bad = folder
    rows = evaluate.run(tiny_eval_config(root, tmp_path / "out", r="0, 1"))
    written = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert sorted(written["meta"]["skipped"]) == bad
    assert [row["count"] for row in rows] == [9, 9]


@pytest.mark.slow
def test_training_records_skipped_images_in_metrics_jsonl(tmp_path):
    import tiny_train_config
    from tome_jax import train_lib

    write_images(tmp_path / "data" / "train", 0, per_class=7)  # with 3 bad: 24 files, 3 batches of 8
    write_images(tmp_path / "data" / "test", 100)
    bad = write_bad_images(tmp_path / "data" / "train") + write_bad_images(tmp_path / "data" / "test")
    config = tiny_train_config.get_config()
    config.update(dataset=f"folder:{tmp_path / 'data'}", batch_size=8, eval_batch_size=8, num_steps=3,
                  eval_every=3, checkpoint_every=3, r="1", eval_r="1", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # fmt: skip
    config.model_overrides = dict(width=16, depth=2, num_heads=2, patch_size=4, img_size=SIZE, num_classes=3)
    train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = [name for record in records for name in record.get("data/skipped", [])]
    assert sorted(skipped) == sorted(bad)  # each once, at the step that met it
    assert all(set(record) == {"step", "data/skipped"} for record in records if "data/skipped" in record)


# ---------------------------------------------------------------- 2. r checked first, rows kept


@pytest.mark.parametrize(
    "text, message",
    [
        ("banana", "r value 'banana' in 'banana' is not a number"),
        ("0, 2, -3", "r value '-3' in '0, 2, -3': r must be >= 0, got -3"),
        ("4, (8, 2)", r"r value '\(8, 2\)' in '4, \(8, 2\)': inflection must be a number in \[-1, 1\]"),
        ("[4, -1]", r"r\[1\] must be >= 0"),
        ("2.5", "r value '2.5' .* expected an int"),
        ("1] + [2", r"cannot parse r values '1\] \+ \[2'"),
    ],
)
def test_r_mistakes_quote_what_was_typed(text, message):
    with pytest.raises(ValueError, match=message) as error:
        schedules.parse_r_values(text)
    assert "<ast." not in str(error.value)


def test_a_clamped_r_says_what_it_was_clamped_to():
    # 64 patches and a class token: each layer merges at most half its 64, 48, ... patches.
    line = schedules.describe_r(1000, 65, 12, 1)
    assert line.startswith("r=1000: 65 tokens -> 2; clamped to [32, 16, 8, 4, 2, 1, 0, 0, 0, 0, 0, 0] per layer")
    assert schedules.describe_r(2, 65, 3, 1) == "r=2: 65 tokens -> 59; [2, 2, 2] per layer"
    # eval.py passes the model's method's limit: ToMe's is the half, and says so.
    half = "(a layer merges at most half of its unprotected tokens)"
    assert line.endswith(half) and schedules.describe_r(1000, 65, 12, 1, tome_jax.reduce.ToMe().max_r) == line


def test_eval_checks_every_r_before_loading_the_model_or_data(tmp_path):
    """Neither the model file nor the data exist: only r can be the error."""
    config = tiny_eval_config(tmp_path / "no_data", tmp_path, r="0, 4, -3")
    config.model, config.pretrained = str(tmp_path / "missing.safetensors"), True
    with pytest.raises(ValueError, match="r value '-3'"):
        evaluate.run(config)
    config = tiny_eval_config(tmp_path / "no_data", tmp_path, r="0, [1, 1, 1]")  # 3 layers for a 2-layer model
    with pytest.raises(ValueError, match=r"r=\[1, 1, 1\] lists 3 layers but the model has 2"):
        evaluate.run(config)


def test_a_failing_sweep_keeps_the_rows_it_finished(tmp_path):
    model = tome_jax.ViT(img_size=SIZE, patch_size=4, width=16, depth=2, num_heads=2, num_classes=3)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
    batch = {"images": np.ones((2, SIZE, SIZE, 3), np.float32), "labels": np.zeros(2, np.int32), "mask": np.ones(2, bool)}
    calls = []

    def make_batches():
        calls.append(1)
        if len(calls) > 1:
            raise OSError("the disk went away")
        return [batch]

    def write(rows):
        report.write_results(rows, tmp_path, {"title": "t"})

    with pytest.raises(OSError):
        evaluate.sweep(model, variables, [0, 1], make_batches, timing_images=[jnp.asarray(batch["images"])],
                       runs=1, on_row=write)  # fmt: skip
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [row["r"] for row in rows] == ["0"] and rows[0]["count"] == 2
    assert (tmp_path / "sweep.csv").read_text().count("\n") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.csv", "sweep.json", "sweep.png"]


# ---------------------------------------------------------------- 5. one line per mistake


def test_channels_first_and_empty_batches_are_named():
    model = tome_jax.ViT(img_size=32, patch_size=4, width=16, depth=1, num_heads=2, num_classes=3)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"got \(2, 3, 32, 32\): channels first; transpose to NHWC: x.transpose\(0, 2, 3, 1\)"):
        model.apply(variables, jnp.zeros((2, 3, 32, 32)))
    with pytest.raises(ValueError, match="an empty batch"):
        model.apply(variables, jnp.zeros((0, 32, 32, 3)))


@pytest.mark.parametrize("batch_size", [0, -4])
def test_batch_sizes_below_one_are_named(folder, batch_size):
    root, *_ = folder
    dataset = data.builder(f"folder:{root}")
    with pytest.raises(ValueError, match=f"batch_size must be a positive int, got {batch_size}"):
        next(data.eval_batches(dataset, "test", PLAIN, batch_size))
    with pytest.raises(ValueError, match=f"global batch size must be a positive int, got {batch_size}"):
        data.steps_per_epoch(dataset, "train", batch_size)


def test_truncated_and_foreign_checkpoints_name_their_path(tmp_path):
    from safetensors.numpy import save_file

    model = tome_jax.ViT(img_size=SIZE, patch_size=4, width=16, depth=1, num_heads=2, num_classes=3)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
    whole = tmp_path / "whole.safetensors"
    save_file(tome_jax.to_timm_state_dict(model, variables), whole, metadata={"config": '{"num_heads": 2}'})
    tome_jax.from_timm(whole)  # the intact file reads
    broken = {
        "truncated.safetensors": whole.read_bytes()[:-100],
        "foreign.safetensors": b"\x00" * 64,
        "foreign.npz": b"PK not really a zip",
        "truncated.pth": b"PK\x03\x04" + b"\x00" * 40,
    }
    for name, content in broken.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{tmp_path / name}.* is not a readable"):
            tome_jax.from_timm(tmp_path / name)
    for entry, problem in {"{not json": "is not JSON", '[0.5, 0.5]': "needs 'mean' and 'std'"}.items():
        save_file({"x": np.zeros(1, np.float32)}, whole, metadata={"pretrained_cfg": entry})
        with pytest.raises(ValueError, match=f"{whole}: .*pretrained_cfg metadata {problem}"):
            tome_jax.pretrained_data_config(whole)


def test_a_timm_name_without_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'tome_jax\[torch\]'"):
        tome_jax.from_timm("vit_tiny_patch16_224")


def test_the_commands_print_mistakes_as_one_line(monkeypatch, capsys):
    from ml_collections import ConfigDict

    with pytest.raises(SystemExit) as exit_:
        cli._run("eval", lambda: schedules.parse_r_values("banana"), traceback=False)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: r value 'banana'")
    with pytest.raises(ValueError):
        cli._run("eval", lambda: schedules.parse_r_values("banana"), traceback=True)
    # ml_collections' own error for an unknown key, with its suggestion.
    monkeypatch.setattr(sys, "argv", ["eval.py", "--config.bach_size=4"])
    with pytest.raises(AttributeError) as error:
        ConfigDict({"batch_size": 1}).bach_size  # noqa: B018
    assert cli._unknown_key(error.value) == (
        "--config.bach_size: the config has no key 'bach_size'; did you mean \"batch_size\" instead of \"bach_size\"?"
    )


@pytest.mark.slow
def test_eval_py_mistakes_end_with_one_line_and_status_2():
    """As a user sees them: the whole command (imports TensorFlow and JAX, so slow)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "HF_HUB_OFFLINE": "1"}
    for args, message in [
        (["--config.bach_size=4"], 'did you mean "batch_size"'),
        (["--config.r=0, 2, -3"], "r value '-3'"),
        (["--config.model=vit_tiny_patch16_224"], "error: "),  # timm loads (before TensorFlow: no crash)
    ]:
        done = subprocess.run([sys.executable, "eval.py", *args], cwd=REPO, env=env, capture_output=True, text=True)
        assert done.returncode == 2, done.stderr
        error_lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert len(error_lines) == 1 and message in error_lines[0], done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_the_commands_load_a_timm_model_before_tensorflow(tmp_path):
    """triton (under timm) loaded after TensorFlow ends the process with a segfault,
    so each command loads its model before its data (see tome_jax.data)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "HF_HUB_OFFLINE": "1"}
    timm_model = ["--config=tests/tiny_train_config.py", "--config.model=vit_tiny_patch16_224", "--config.pretrained=True"]
    for args, status in [
        # timm loads, then its weights cannot download here: the process lives to say so.
        (["train.py", *timm_model, f"--workdir={tmp_path / 'train'}"], 2),
        (["train.py", *timm_model, "--step_time_r=0"], 2),
        # timm's preprocessing, then the data; ViT attributes set from the command line.
        (["eval.py", "--config.model=vit_tiny_patch16_224", "--config.pretrained=False", "--config.preprocess=timm",
          "--config.model_overrides.num_classes=10", "--config.model_overrides.depth=1", "--config.limit=2",
          "--config.batch_size=2", "--config.r=0", "--config.timing_runs=1", f"--config.workdir={tmp_path / 'eval'}"], 0),
        (["-m", "tome_jax", "vis", str(tmp_path / "vis.png"), "--model=vit_tiny_patch16_224", "--random-weights",
          "--preprocess=timm", "--images=1", "--r=0"], 0),
    ]:  # fmt: skip
        done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True)
        assert done.returncode == status, (args, done.returncode, done.stderr[-3000:])
    assert (tmp_path / "vis.png").exists() and (tmp_path / "eval" / "sweep.json").exists()


# ---------------------------------------------------------------- 6. non-finite logits


def test_non_finite_logits_are_counted_on_valid_rows_only():
    logits = np.zeros((4, 3), np.float32)
    logits[0, 1] = np.nan
    logits[2, 0] = np.inf
    logits[3, 2] = np.nan  # padding: not counted
    mask = np.array([True, True, True, False])
    counts = evaluate._correct_counts(logits, np.zeros(4, np.int32), mask)
    assert int(counts[3]) == 2


def test_a_model_with_nan_weights_fails_its_sweep_naming_r():
    model = tome_jax.ViT(img_size=SIZE, patch_size=4, width=16, depth=2, num_heads=2, num_classes=3)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
    variables = jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), variables)
    batch = {"images": np.ones((3, SIZE, SIZE, 3), np.float32), "labels": np.zeros(3, np.int32),
             "mask": np.array([True, True, False])}  # fmt: skip
    with pytest.raises(ValueError, match=r"^r=1: 2 of 2 images gave non-finite logits"):
        evaluate.sweep(model, variables, [1], lambda: [batch], timing_images=[jnp.asarray(batch["images"])], runs=1)
