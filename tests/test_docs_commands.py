"""Every shell command in README.md and docs/*.md, as written, cut down to a few images or steps.

The commands of one page run in order in one scratch directory (so a later command finds what an
earlier one wrote: a search's schedule, a training run's checkpoints), beside links to the
repository's `configs/`, `assets/`, `eval.py` and `train.py`. A few cannot run here (a download,
ImageNet on disk, a GPU); `OFFLINE_IMPOSSIBLE` names them and why, and the fast test still reads
each one's config and overrides. End to end they take minutes, so they run where
TOME_JAX_DOCS_COMMANDS=1 (`.ci/run` sets it for a second pass over this file).
"""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# Commands (by a substring) that cannot run on an offline CPU machine, and why.
OFFLINE_IMPOSSIBLE = {
    "python3 -m venv": "sets up an environment: .ci/run does it",
    "pip install": "installs the package: .ci/run does it",
    "git clone": "downloads a repository",
    "PYTHONPATH=/tmp/ToMe": "needs the official ToMe cloned (git clone above)",
    "/data/tfds": "needs ImageNet prepared on disk",
    "--device=gpu": "needs a GPU",
    "vit_small_patch16_224.augreg_in21k_ft_in1k": "downloads timm weights",
    "--config.model=google/": "downloads Hugging Face weights (a hub id)",
}
# Appended to a command, by the program it runs (the first that matches): a few images, steps,
# rounds; one budget of the comparison.
CUTS = {
    "--step_time_r": "--rounds=1 --config.batch_size=8",
    "train.py": (
        "--config.num_steps=2 --config.batch_size=8 --config.eval_batch_size=8 --config.train_limit=64 "
        "--config.eval_limit=16 --config.eval_every=2 --config.checkpoint_every=2 --config.log_every=1 "
        "--config.shuffle_buffer=64"
    ),
    "configs/compare_methods.py": '--config.limit=16 --config.batch_size=8 --config.timing_runs=1 --config.budget_r="4"',
    "eval.py": "--config.limit=16 --config.batch_size=8 --config.timing_runs=1",
    'eval "$(': "--config.limit=16 --config.batch_size=8 --config.timing_runs=1",  # the eval.py command a file holds
    "tome-jax-bench": "--config.runs=1 --config.warmup=0 --config.input_batches=1 --config.batch_sizes=2 "
    '--config.peak_sizes="64"',
    "tome-jax-vis": "",
}


def page_commands(page: pathlib.Path) -> list[str]:
    """The commands of a page's bash blocks, continuation lines joined, comment lines dropped."""
    commands = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", page.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    return commands


def without_comment(command: str) -> str:
    """The command without a trailing `# ...` (a # inside quotes or a word stays)."""
    quote = None
    for i, char in enumerate(command):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or command[i - 1].isspace()):
            return command[:i].rstrip()
    return command


def cut_down(command: str) -> str:
    """The command with its program's cuts appended (before a trailing `&`)."""
    command = without_comment(command)
    background = command.endswith("&")
    command = command.rstrip("& ")
    cut = next((flags for program, flags in CUTS.items() if program in command), None)
    if cut:
        command = f"{command} {cut}"
    return command + (" &" if background else "")


def is_runnable(command: str) -> bool:
    return not any(marker in command for marker in OFFLINE_IMPOSSIBLE)


def all_commands() -> list[tuple[str, str]]:
    return [(page.name, command) for page in PAGES for command in page_commands(page)]


def test_every_documented_command_either_runs_here_or_says_why_not():
    commands = all_commands()
    assert len(commands) > 30, commands
    for _, command in commands:
        if is_runnable(command):
            assert any(p in command for p in (*CUTS, "export ")), f"no cut for: {command}"


@pytest.mark.parametrize("page, command", all_commands(), ids=lambda v: v if len(v) < 24 else v[:60])
def test_every_documented_config_override_names_a_key(page, command):
    """Each `--config.KEY=VALUE` of a command names a key of the config it loads (read in-process)."""
    words = shlex.split(without_comment(command).rstrip("& "))
    program = next((w for w in words if w.endswith(("eval.py", "train.py")) or w.startswith("tome-jax-")), None)
    if program is None or program == "tome-jax-vis":
        return
    default = {"eval.py": "eval_cifar10.py", "tome-jax-eval": "eval_cifar10.py", "train.py": "train_cifar10.py",
               "tome-jax-train": "train_cifar10.py", "tome-jax-bench": "bench_cpu.py"}[pathlib.Path(program).name]  # fmt: skip
    config_file = next((w.split("=", 1)[1] for w in words if w.startswith("--config=")), None)
    if config_file is None and "--config" in words:
        config_file = words[words.index("--config") + 1]
    config_file = config_file or f"configs/{default}"
    config = load_config(REPO / config_file)
    for word in words:
        if word.startswith("--config."):
            key = word[len("--config.") :].split("=", 1)[0]
            node = config
            for part in key.split("."):
                assert part in node, f"{page}: {command}\n  --config.{key}: the config has no key {part!r}"
                node = node[part]


def load_config(path: pathlib.Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"docs_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def scratch_directory(root: pathlib.Path) -> pathlib.Path:
    """A directory to run commands in: links to the repository's inputs, its own outputs."""
    for name in ("configs", "assets", "eval.py", "train.py", "tome_jax", "examples"):
        (root / name).symlink_to(REPO / name)
    (root / "docs").mkdir()  # the pictures' command writes here
    return root


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TOME_JAX_DOCS_COMMANDS") != "1", reason="set TOME_JAX_DOCS_COMMANDS=1 (.ci/run does)")
@pytest.mark.parametrize("page", [p for p in PAGES if any(is_runnable(c) for c in page_commands(p))], ids=lambda p: p.name)
def test_every_documented_command_runs_cut_down(page, tmp_path):
    root = scratch_directory(tmp_path)
    env = {**os.environ, "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("XLA_FLAGS", None)  # the commands' own, as a user's shell has them
    env["JAX_PLATFORMS"] = "cpu"
    script = ["set -e"]
    for command in page_commands(page):
        if is_runnable(command):
            script += [f"echo '+ {command[:200]}' >&2", cut_down(command)]
    script.append("wait")
    done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{page.name}: exit {done.returncode}\n{done.stderr[-4000:]}"
