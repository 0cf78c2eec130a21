"""The command-line programs, installed as console scripts with the package.

    tome-jax-eval  [--config FILE] [--config.KEY=VALUE ...]   accuracy, images/s, GFLOPs over r
    tome-jax-train --config FILE --workdir DIR                 train or fine-tune with merging
    tome-jax-bench [--config FILE] [--device cpu|gpu|tpu]      tome_jax beside PyTorch ToMe
    tome-jax-vis   OUTPUT.png [--model ...] [--r "2, 4, 5"]    pictures of the merges

`python eval.py` and `python train.py` in the repository run the first two.
Configs are ml_collections files; the defaults ship in `tome_jax/configs/`
(the repository's `configs/`), and every key can be overridden on the command line.

A mistake (an unknown config key, a bad value, a missing or unreadable file, an
extra not installed: the library's ValueError, TypeError, OSError and ImportError)
ends a command with one line, `error: ...`, and exit status 2; `--traceback` shows
the whole traceback instead.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any, Callable, Sequence

import numpy as np

CONFIGS = pathlib.Path(__file__).resolve().parent / "configs"
MISTAKES = (ValueError, TypeError, OSError, ImportError)


def _fail(message) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _run(job: Callable[[], Any], traceback: bool) -> Any:
    """Runs a command's job, a mistake as one line (see the module docstring)."""
    try:
        return job()
    except MISTAKES as error:
        if traceback:
            raise
        _fail(error)


def _config_flag(default: str, help_text: str):
    """The --config flag; ml_collections applies the --config.KEY overrides here."""
    from absl import flags
    from ml_collections import config_flags

    flags.DEFINE_bool("traceback", False, "On an error, show the whole traceback instead of one line.")
    try:
        return config_flags.DEFINE_config_file("config", str(CONFIGS / default), help_text)
    except (AttributeError, KeyError) as error:  # an override names no key of the config
        if "--traceback" in sys.argv:
            raise
        _fail(_unknown_key(error))


def _unknown_key(error: Exception) -> str:
    """ml_collections' unknown-key error (a KeyError, maybe inside an AttributeError),
    whose text is the key and a did-you-mean line, as one line naming the flag."""
    inner = error.args[0] if error.args and isinstance(error.args[0], KeyError) else error
    key, _, hint = str(inner.args[0] if inner.args else inner).partition("\n")
    key = key.strip("'\"")
    overrides = [arg.split("=")[0] for arg in sys.argv if arg.startswith("--config.")]
    flag = next((o for o in overrides if key in o.split(".")), "--config")
    hint = f"; {hint[0].lower()}{hint[1:]}" if hint else " (the config file defines every key it takes)"
    return f"{flag}: the config has no key {key!r}{hint}"


def _quiet_logs() -> None:
    """orbax and TFDS log every step at INFO; warnings and errors only, unless asked."""
    from absl import app, logging

    if not app.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def _no_positional(argv: Sequence[str]) -> None:
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")


def eval_main() -> None:
    """tome-jax-eval: eval.py's sweep (`tome_jax.evaluate.run`)."""
    from absl import app

    config = _config_flag("eval_cifar10.py", "Evaluation config (an ml_collections file).")

    def main(argv):
        from absl import flags

        _no_positional(argv)
        _quiet_logs()
        from tome_jax import evaluate

        _run(lambda: evaluate.run(config.value), flags.FLAGS.traceback)

    app.run(main)


def train_main() -> None:
    """tome-jax-train: train.py (`tome_jax.train_lib.train_and_evaluate`), or step times only
    (`tome_jax.step_times.compare_step_times`)."""
    from absl import app, flags

    config = _config_flag("train_cifar10.py", "Training config (an ml_collections file).")
    workdir = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard go here.")
    step_time_r = flags.DEFINE_string(
        "step_time_r",
        None,
        'Instead of training, time one train step at each of these r (e.g. "0, (8, -1)"), side by side.',
    )
    rounds = flags.DEFINE_integer("rounds", 10, "Timed rounds for --step_time_r.")

    def step_times():
        from tome_jax import schedules
        from tome_jax.step_times import compare_step_times

        r_values = [schedules.r_label(r) for r in schedules.parse_r_values(step_time_r.value)]
        rows = compare_step_times(config.value, r_values, rounds.value)
        print("| method | settings | r | step time (s) | images/s | speed-up over the first r |\n" + "|---" * 6 + "|")
        for row in rows:
            print(
                f"| {row['method']} | {row['settings']} | {row['r']} | {row['step_time_s']:.3f} "
                f"| {row['images_per_s']:.1f} | {row['speedup']:.2f}x |"
            )

    def main(argv):
        _no_positional(argv)
        _quiet_logs()
        from tome_jax import divergence, preemption, train_lib

        if step_time_r.value:
            _run(step_times, flags.FLAGS.traceback)
            return
        if not workdir.value:
            raise app.UsageError("--workdir is required for training")
        def train():
            try:
                return train_lib.train_and_evaluate(config.value, workdir.value)
            except divergence.NonFiniteError as error:  # the run diverged: no mistake in the input
                if flags.FLAGS.traceback:
                    raise
                print(f"error: {error}", file=sys.stderr)
                preemption.exit_now(1)  # at once: tf.data's teardown is slow

        _run(train, flags.FLAGS.traceback)

    app.run(main)


def bench_main() -> None:
    """tome-jax-bench: the side-by-side benchmark (`tome_jax.bench.run`)."""
    from absl import app, flags

    config = _config_flag("bench_cpu.py", "Benchmark config (an ml_collections file).")
    device = flags.DEFINE_enum("device", "cpu", ["cpu", "gpu", "tpu"], "The JAX platform to run on.")

    def main(argv):
        _no_positional(argv)
        from tome_jax import bench

        bench.select_platform(device.value)
        _run(lambda: bench.run(config.value, device.value), flags.FLAGS.traceback)

    app.run(main)


def _vis_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tome-jax-vis",
        description="Draws a ViT's token merges on a few dataset images into one PNG: "
        "the images in the first row, then one row per r.",
    )
    parser.add_argument("output", help="the PNG to write")
    parser.add_argument(
        "--model",
        default="assets/vit_tiny_p4_cifar10.safetensors",
        help="anything tome_jax.from_timm reads: a checkpoint file (relative paths may be "
        "relative to the repository) or a timm model name (downloads its weights)",
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="for a timm model name: its architecture with random weights, nothing downloaded",
    )
    parser.add_argument("--dataset", default="bundled_cifar10", help="a tome_jax.data dataset name")
    parser.add_argument("--data-dir", help="TFDS data directory")
    parser.add_argument("--split", default="test")
    parser.add_argument("--images", type=int, default=8, help="how many images (columns)")
    parser.add_argument("--offset", type=int, default=0, help="skip this many images first")
    parser.add_argument("--r", default="2, 4, 5", help='r specs, one row each: "4, (8, -1), [4, 4, 2]"')
    parser.add_argument("--scale", type=int, help="integer display upscale (default: near 256 pixels)")
    parser.add_argument(
        "--preprocess",
        choices=("explicit", "timm"),
        default="explicit",
        help="timm: the model's own timm preprocessing; explicit: the options below",
    )
    parser.add_argument("--mean", type=float, nargs=3, help="default: CIFAR-10's")
    parser.add_argument("--std", type=float, nargs=3, help="default: CIFAR-10's")
    parser.add_argument("--crop-pct", type=float, default=1.0)
    parser.add_argument("--interpolation", default="bicubic")
    parser.add_argument("--traceback", action="store_true", help="on an error, the whole traceback")
    return parser


def vis_main(argv: Sequence[str] | None = None) -> None:
    """tome-jax-vis: loads the model and images, draws the merges, writes the PNG."""
    parser = _vis_parser()
    args = parser.parse_args(argv)
    if args.images < 1 or args.offset < 0:
        parser.error(f"--images must be >= 1 and --offset >= 0, got {args.images} and {args.offset}")
    _run(lambda: _visualize(args), args.traceback)


def _visualize(args: argparse.Namespace) -> None:
    from tome_jax import data, evaluate, schedules, vis
    from tome_jax.convert import from_timm
    from tome_jax.registry import create_model
    from tome_jax.vit import init_params

    r_values = schedules.parse_r_values(args.r)
    args.mean = args.mean or data.CIFAR10_MEAN
    args.std = args.std or data.CIFAR10_STD
    source = evaluate.resolve_source(args.model)
    if args.random_weights:
        model = create_model(source)
        variables = {"params": init_params(model)}
    else:
        model, variables = from_timm(source)
    for r_value in r_values:
        print(model.describe_r(r_value))
    # The options carry the preprocessing fields of an eval.py config.
    preprocess = evaluate.preprocess_for(args, model, source)
    count = args.offset + args.images
    batches = data.eval_batches(data.builder(args.dataset, args.data_dir), args.split, preprocess, count, limit=count)
    batch = next(batches)
    images = batch["images"][batch["mask"]][args.offset :]
    # Shown as the model saw them: the same crop, normalisation undone.
    display = np.clip(images * np.asarray(preprocess.std) + np.asarray(preprocess.mean), 0.0, 1.0)
    vis.save_png(vis.visualize(model, variables, images, display, r_values, scale=args.scale), args.output)
    print(f"wrote {args.output}")


COMMANDS = {"eval": eval_main, "train": train_main, "bench": bench_main, "vis": vis_main}


def main() -> None:
    """`python -m tome_jax COMMAND [...]`: the console scripts without installing them."""
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python -m tome_jax {{{','.join(COMMANDS)}}} [options]; --help for a command's options")
    command = sys.argv.pop(1)
    sys.argv[0] = f"tome-jax-{command}"
    COMMANDS[command]()
