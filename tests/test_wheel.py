"""The wheel a user installs (`pip install "tome_jax[eval]"`, not editable): it carries the bundled
default's model and data, and its `tome-jax-eval` runs that default from any folder; the rule that
finds them (`data.find_shipped`)."""

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from tome_jax import data

REPO = pathlib.Path(__file__).resolve().parents[1]
SHIPPED = ("tome_jax/assets/vit_tiny_p4_cifar10.safetensors", "tome_jax/assets/cifar10-jpg.tar.gz")


def run(args, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def build_wheel(root: pathlib.Path) -> pathlib.Path:
    """The wheel, built offline (this environment's setuptools) from a copy of the sources, so that
    the build's files stay out of the clone."""
    source = root / "source"
    # tome_jax/assets is a link to ../assets: the copy keeps it and links assets/ to the clone's.
    shutil.copytree(REPO / "tome_jax", source / "tome_jax", symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    (source / "assets").symlink_to(REPO / "assets")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    out = root / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", "-w", out, source])
    (built,) = out.glob("tome_jax-*.whl")
    return built


def fresh_venv(root: pathlib.Path) -> pathlib.Path:
    """A virtual environment without tome_jax that borrows this one's packages (jax, TensorFlow, ...)
    through a .pth line: the directories it names join sys.path, but their own .pth files (the
    editable install's finder) are not read, so `import tome_jax` finds only what is installed here."""
    run([sys.executable, "-m", "venv", "--without-pip", root])
    python = root / "bin" / "python"
    site_packages = run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip()
    borrowed = dict.fromkeys(sysconfig.get_path(kind) for kind in ("purelib", "platlib"))
    pathlib.Path(site_packages, "borrowed.pth").write_text("".join(f"{path}\n" for path in borrowed))
    return python


@pytest.mark.slow
def test_installed_wheel_runs_the_bundled_default_from_an_empty_folder(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert all(name in names for name in SHIPPED), names
    assert not [name for name in names if "dinov3" in name and name.startswith("tome_jax/assets/")]
    python = fresh_venv(tmp_path / "venv")
    # A tome_jax among the borrowed packages (a non-editable install) would count as installed.
    install = ["install", "--quiet", "--no-deps", "--no-index", "--ignore-installed", wheel]
    run([sys.executable, "-m", "pip", "--python", python, *install])
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    found = run([python, "-c", "import tome_jax; print(tome_jax.__file__)"], cwd=empty, env=env).stdout.strip()
    assert pathlib.Path(found).is_relative_to(tmp_path / "venv"), found
    cut = ["--config.limit=8", "--config.batch_size=8", "--config.r=0", "--config.timing_runs=1"]
    done = run([python.parent / "tome-jax-eval", *cut], cwd=empty, env=env)
    assert "| tome | - | 0 |" in done.stdout, done.stdout
    assert (empty / "results" / "eval_cifar10" / "sweep.json").exists()
    # A documented `--config configs/NAME` is the installed package's too.
    done = run([python.parent / "tome-jax-train", "--config", "configs/train_cifar10.py", "--help"], cwd=empty, env=env)
    assert f"config keys ({pathlib.Path(found).parent / 'configs' / 'train_cifar10.py'};" in done.stdout, done.stdout


def test_assets_and_configs_paths_are_the_current_folders_else_the_packages(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = data.find_shipped("assets/vit_tiny_p4_cifar10.safetensors")
    assert pathlib.Path(shipped) == data.ASSETS / "vit_tiny_p4_cifar10.safetensors"
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "vit_tiny_p4_cifar10.safetensors").touch()  # the current folder's comes first
    assert data.find_shipped("assets/vit_tiny_p4_cifar10.safetensors") == "assets/vit_tiny_p4_cifar10.safetensors"
    assert pathlib.Path(data.find_shipped("configs/bench_cpu.py")) == data.ASSETS.parent / "configs" / "bench_cpu.py"
    for other in ("vit_tiny_patch4_32", "runs/missing.safetensors", str(tmp_path / "assets" / "missing.npz")):
        assert data.find_shipped(other) == other  # a timm name, a path elsewhere: as given
    with pytest.raises(FileNotFoundError, match=r"no file assets/missing.npz in the current folder \(.*\) nor in the installed package"):
        data.find_shipped("assets/missing.npz")
