"""The command-line programs, installed as console scripts with the package.

    tome-jax-eval  [--config FILE] [--config.KEY=VALUE ...]   accuracy, images/s, GFLOPs over r
    tome-jax-train --config FILE --workdir DIR                 train or fine-tune with merging
    tome-jax-bench [--config FILE] [--device cpu|gpu|tpu]      tome_jax beside PyTorch ToMe
    tome-jax-vis   OUTPUT.png [--model ...] [--method NAME]   pictures of the merges

`python eval.py` and `python train.py` in the repository run the first two.
Configs are ml_collections files; the defaults ship in `tome_jax/configs/`
(the repository's `configs/`), and every key can be overridden on the command line.
A relative `--config configs/NAME` or `assets/NAME` (the default model) that the
current folder lacks is the installed package's copy (`data.find_shipped`), so the
commands run from any folder.
`--help` lists a command's flags, its config's keys and each method's settings
(`tome_jax.config_help`), and the extra it needs (`COMMANDS`).

A mistake (an unknown config key or flag, a bad value, a missing or unreadable
file, a module not installed: the library's ValueError, TypeError, OSError and
ImportError, and absl's and ml_collections' flag errors) ends a command with one
line, `error: ...`, and exit status 2; `--traceback` shows the whole traceback instead.
"""

from __future__ import annotations

import argparse
import ast
import os
import pathlib
import sys
from typing import Any, Callable, NamedTuple, NoReturn, Sequence

import numpy as np

CONFIGS = pathlib.Path(__file__).resolve().parent / "configs"
MISTAKES = (ValueError, TypeError, OSError, ImportError)
# absl's help flags, which print only "Try --helpfull" (exit 1): each command answers them itself.
HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def _fail(message) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _run(command: str, job: Callable[[], Any], traceback: bool) -> Any:
    """Runs a command's job, a mistake as one line (see the module docstring); a module
    not installed names the extra that installs it."""
    # TensorFlow (the data pipeline) opens with log lines about its oneDNN kernels and CPU
    # instructions. It only decodes, resizes and augments images here, to the same bytes with
    # oneDNN off. Set before TensorFlow is imported; a value the user set stays.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    try:
        return job()
    except ModuleNotFoundError as error:
        if traceback:
            raise
        _fail(f"no module {error.name!r}: tome-jax-{command} needs pip install '{COMMANDS[command].needs}'")
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
        shipped = " A relative configs/NAME missing from the current folder is the installed package's."
        return config_flags.DEFINE_config_file("config", str(CONFIGS / default), help_text + shipped)
    except (AttributeError, KeyError) as error:  # an override names no key of the default config
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


def _flags_parser(command: str) -> Callable[[list[str]], list[str]]:
    """absl's flag parsing for `app.run`, with --help answered by `_help` (exit 0) and a
    mistake in the flags (an override of a key the --config file lacks) as one line."""

    def parse(argv: list[str]) -> list[str]:
        from absl import flags

        asked = [arg for arg in argv[1:] if arg in HELP_FLAGS]
        try:
            remaining = flags.FLAGS([arg for arg in argv if arg not in HELP_FLAGS])
        except (AttributeError, KeyError) as error:  # ml_collections: an override names no key
            if "--traceback" in argv:
                raise
            _fail(_unknown_key(error))
        except flags.Error as error:  # absl's own: an unknown flag, a bad value, --config after its overrides
            _fail(f"{error} (--help lists the flags)")
        if asked:
            print(_help(command))
            if "--helpfull" in asked:
                print(f"\nabsl's flags:\n{flags.FLAGS.get_help()}")
            sys.exit(0)
        return remaining

    return parse


def _help(command: str) -> str:
    """An absl command's --help: what it does and needs, its flags, the config's keys."""
    from absl import flags
    from ml_collections import config_flags

    from tome_jax import config_help

    about = COMMANDS[command]
    lines = [f"usage: tome-jax-{command} {about.usage}", "", about.summary, f"Needs: pip install '{about.needs}'{about.also}.", "", "flags:"]
    for flag in sorted(flags.FLAGS.flags_by_module_dict()[__name__], key=lambda flag: flag.name):
        value = "FILE" if flag.name == "config" else flag.default
        lines.append(f"  --{flag.name}={value}" if not isinstance(value, bool) else f"  --[no]{flag.name}")
        lines.append(f"      {flag.help}")
    lines.append("  --helpfull\n      This help, then absl's own flags (logging, ...).\n")
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    lines.append(config_help.config_help(flags.FLAGS.config, path))
    return "\n".join(lines)


def _quiet_logs() -> None:
    """orbax and TFDS log every step at INFO; warnings and errors only, unless asked."""
    from absl import app, logging

    if not app.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def _no_positional(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {list(argv[1:])}: the options are flags (--help lists them)")


def _absl_command(command: str, define_flags: Callable[[], Callable[[list[str]], None]]) -> None:
    """Runs an absl command: `define_flags()` defines its flags and returns its main."""

    def job():
        from absl import app

        sys.argv = _shipped_config(sys.argv)  # before define_flags: ml_collections reads sys.argv there
        app.run(define_flags(), flags_parser=_flags_parser(command))

    _run(command, job, "--traceback" in sys.argv)


def _shipped_config(argv: list[str]) -> list[str]:
    """`argv` with a `--config configs/NAME[:ARG]` missing from the current folder naming the
    installed package's copy (`data.find_shipped`), so the documented configs run from any folder."""
    from tome_jax import data

    found = list(argv)
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            flag, value = "--config=", arg.removeprefix("--config=")
        elif i > 0 and argv[i - 1] == "--config":
            flag, value = "", arg
        else:
            continue
        path, colon, argument = value.partition(":")
        found[i] = flag + data.find_shipped(path) + colon + argument
    return found


def eval_main() -> None:
    """tome-jax-eval: eval.py's sweep (`tome_jax.evaluate.run`)."""

    def define_flags():
        config = _config_flag("eval_cifar10.py", "Evaluation config (an ml_collections file).")

        def main(argv):
            _no_positional(argv)
            _quiet_logs()
            from tome_jax import evaluate

            evaluate.run(config.value)

        return main

    _absl_command("eval", define_flags)


def train_main() -> None:
    """tome-jax-train: train.py (`tome_jax.train_lib.train_and_evaluate`), or step times only
    (`tome_jax.step_times.compare_step_times`)."""

    def define_flags():
        from absl import flags

        config = _config_flag("train_cifar10.py", "Training config (an ml_collections file).")
        workdir = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard go here (required to train).")
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
                step_times()
                return
            if not workdir.value:
                raise ValueError("--workdir=DIR is required to train (or --step_time_r to time train steps only)")
            try:
                train_lib.train_and_evaluate(config.value, workdir.value)
            except divergence.NonFiniteError as error:  # the run diverged: no mistake in the input
                if flags.FLAGS.traceback:
                    raise
                print(f"error: {error}", file=sys.stderr)
                preemption.exit_now(1)  # at once: tf.data's teardown is slow

        return main

    _absl_command("train", define_flags)


def bench_main() -> None:
    """tome-jax-bench: the side-by-side benchmark (`tome_jax.bench.run`)."""

    def define_flags():
        from absl import flags

        config = _config_flag("bench_cpu.py", "Benchmark config (an ml_collections file).")
        device = flags.DEFINE_enum("device", "cpu", ["cpu", "gpu", "tpu"], "The JAX platform to run on.")

        def main(argv):
            _no_positional(argv)
            from tome_jax import bench

            bench.select_platform(device.value)
            bench.run(config.value, device.value)

        return main

    _absl_command("bench", define_flags)


def _vis_parser() -> argparse.ArgumentParser:
    from tome_jax import config_help, reduce

    about = COMMANDS["vis"]
    settings = "\n".join(config_help.methods_help(reduce.default_settings(), "--method={method} --setting {key}={value!r}"))
    parser = argparse.ArgumentParser(
        prog="tome-jax-vis",
        usage=f"tome-jax-vis {about.usage}",
        description=f"{about.summary}: the images in the first row, then one row per r.\n"
        f"Needs: pip install '{about.needs}'{about.also}.",
        epilog=settings,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("output", help="the picture to write, in the format its suffix names (.png, .jpg, .webp)")
    parser.add_argument(
        "--model",
        default="assets/vit_tiny_p4_cifar10.safetensors",
        help="anything tome_jax.from_timm or from_hf reads: a checkpoint file (a relative assets/NAME missing "
        "here is the installed package's), a timm model name (downloads its weights) or a Hugging Face model "
        "directory or hub id (default: %(default)s)",
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="the model's architecture (a timm name's or a file's) with random weights, nothing downloaded",
    )
    parser.add_argument(
        "--method", default="tome", choices=list(reduce.METHODS), help="how blocks remove tokens (default: %(default)s)"
    )
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one of the method's settings (below), e.g. --method=pitome --setting margin=0.5; repeatable",
    )
    parser.add_argument("--dataset", default="bundled_cifar10", help="a tome_jax.data dataset name (default: %(default)s)")
    parser.add_argument("--data-dir", help="TFDS data directory")
    parser.add_argument("--split", default="test", help="(default: %(default)s)")
    parser.add_argument("--images", type=int, default=8, help="how many images (columns) (default: %(default)s)")
    parser.add_argument("--offset", type=int, default=0, help="skip this many images first (default: %(default)s)")
    parser.add_argument("--r", default="2, 4, 5", help='r specs, one row each: "4, (8, -1), [4, 4, 2]" (default: %(default)s)')
    parser.add_argument("--scale", type=int, help="integer display upscale (default: near 256 pixels)")
    parser.add_argument(
        "--preprocess",
        choices=("explicit", "timm"),
        default="explicit",
        help="timm: the model's own timm preprocessing; explicit: the options below (default: %(default)s)",
    )
    parser.add_argument("--mean", type=float, nargs=3, help="default: CIFAR-10's")
    parser.add_argument("--std", type=float, nargs=3, help="default: CIFAR-10's")
    parser.add_argument("--crop-pct", type=float, default=1.0, help="(default: %(default)s)")
    parser.add_argument("--interpolation", default="bicubic", help="(default: %(default)s)")
    parser.add_argument("--traceback", action="store_true", help="on an error, the whole traceback")
    return parser


def _setting(text: str) -> tuple[str, Any]:
    """"margin=0.5" -> ("margin", 0.5): a Python literal, else the text as a string."""
    key, equals, value = text.partition("=")
    if not equals:
        raise ValueError(f"--setting {text!r}: give KEY=VALUE, e.g. --setting margin=0.5")
    try:
        return key.strip(), ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        return key.strip(), value.strip()


def vis_main(argv: Sequence[str] | None = None) -> None:
    """tome-jax-vis: loads the model and images, draws the merges, writes the picture."""

    def job():
        parser = _vis_parser()
        args = parser.parse_args(argv)
        if args.images < 1 or args.offset < 0:
            parser.error(f"--images must be >= 1 and --offset >= 0, got {args.images} and {args.offset}")
        _visualize(args)

    _run("vis", job, "--traceback" in (sys.argv[1:] if argv is None else argv))


def _visualize(args: argparse.Namespace) -> None:
    from tome_jax import data, evaluate, reduce, schedules, vis
    from tome_jax.vit import init_params

    # Mistakes in the options end the command here, before anything loads.
    vis.image_format(args.output)
    r_values = schedules.parse_r_values(args.r)
    method = reduce.create(args.method, **dict(map(_setting, args.setting)))
    reduce.check_tracks_sources(method)
    args.mean = args.mean or data.CIFAR10_MEAN
    args.std = args.std or data.CIFAR10_STD
    source = data.find_shipped(args.model)
    model, params = evaluate.model_from_source(source, pretrained=not args.random_weights, reduction=method)
    variables = {"params": init_params(model) if params is None else params}
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
    vis.save_image(vis.visualize(model, variables, images, display, r_values, scale=args.scale), args.output)
    print(f"wrote {args.output}")


class Command(NamedTuple):
    """A command of `python -m tome_jax` and its console script, as --help describes it."""

    main: Callable[[], None]
    usage: str  # the arguments after its name
    summary: str
    needs: str  # the extra of pyproject.toml it needs
    also: str  # what else some uses need


COMMANDS = {
    "eval": Command(
        eval_main,
        "[--config FILE] [--config.KEY=VALUE ...]",
        "Accuracy, images/s and GFLOPs of a ViT with token merging, over a sweep of r",
        "tome_jax[eval]",
        " (a timm model name or a .pth/.bin file: also 'tome_jax[torch]')",
    ),
    "train": Command(
        train_main,
        "--config FILE --workdir DIR [--config.KEY=VALUE ...]",
        "Train or fine-tune a ViT with token merging, sharded over all devices",
        "tome_jax[train]",
        " (a timm model name or a .pth/.bin file: also 'tome_jax[torch]')",
    ),
    "bench": Command(
        bench_main,
        "[--config FILE] [--device cpu|gpu|tpu] [--config.KEY=VALUE ...]",
        "The speed of tome_jax beside timm and PyTorch ToMe, and the device's matmul peak",
        "tome_jax[train]",
        " (the PyTorch columns: also 'tome_jax[torch]'; without it they are skipped)",
    ),
    "vis": Command(
        vis_main,
        "OUTPUT.png [--model ...] [--method NAME] [--r \"2, 4, 5\"] [...]",
        "Draws a ViT's token merges on a few dataset images into one picture",
        "tome_jax[eval]",
        " (a timm model name: also 'tome_jax[torch]')",
    ),
}


def main() -> None:
    """`python -m tome_jax COMMAND [...]`: the console scripts without installing them."""
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        lines = [f"usage: python -m tome_jax {{{','.join(COMMANDS)}}} [options] (or tome-jax-COMMAND [options])", ""]
        lines += [f"  {name:6} {command.summary} (needs '{command.needs}')" for name, command in COMMANDS.items()]
        lines.append("\npython -m tome_jax COMMAND --help lists a command's options, config keys and method settings.")
        asked = sys.argv[1:] and sys.argv[1] in HELP_FLAGS
        print("\n".join(lines), file=sys.stdout if asked else sys.stderr)
        sys.exit(0 if asked else 2)
    command = sys.argv.pop(1)
    sys.argv[0] = f"tome-jax-{command}"
    COMMANDS[command].main()
