"""The package's shape: modules in layers, imports pointing one way, a light `import tome_jax`."""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "tome_jax"

# Lower layers never import higher ones. Within a layer, imports are allowed but
# must not form a cycle (checked below over the whole package).
LAYERS = {
    "algorithm": [
        "tome_jax.merge", "tome_jax.schedules", "tome_jax.tokens", "tome_jax.rope", "tome_jax.dtem", "tome_jax.attention",
        "tome_jax.reduce",
    ],
    "model": ["tome_jax.layers", "tome_jax.vit", "tome_jax.registry", "tome_jax.features", "tome_jax.torch_tome"],
    "conversion": ["tome_jax.convert"],
    "data": ["tome_jax.data"],
    "engine": [
        "tome_jax.method_config", "tome_jax.measure", "tome_jax.report", "tome_jax.budget", "tome_jax.checkpoints",
        "tome_jax.evaluate",
        "tome_jax.sharding", "tome_jax.optim", "tome_jax.divergence", "tome_jax.preemption",
        "tome_jax.metrics_log", "tome_jax.train_lib", "tome_jax.step_times", "tome_jax.bench", "tome_jax.vis",
    ],
    "scripts": ["tome_jax.cli", "tome_jax.config_help", "tome_jax.__main__", "tome_jax.configs"],
}  # fmt: skip
# What `import tome_jax` must not pull in: the data, training, plotting and torch stacks.
HEAVY = ("tensorflow", "tensorflow_datasets", "torch", "timm", "optax", "orbax", "matplotlib", "tqdm", "PIL")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported_modules(name: str) -> set[str]:
    """The package's modules that `name` imports anywhere: at the top, inside functions, under `if`."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package up
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                # `from tome_jax import merge` imports the module; `from tome_jax import ViT` the package.
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {module for module in found if module in MODULES and module != name}


GRAPH = {name: imported_modules(name) for name in MODULES}


def layer_of(name: str) -> int:
    for index, prefixes in enumerate(LAYERS.values()):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{name} is in no layer; add it to LAYERS")


def test_every_module_has_a_layer():
    for name in MODULES:
        if name != "tome_jax":  # the facade re-exports from the layers below the engine
            layer_of(name)


def test_imports_point_down_the_layers():
    layer_names = list(LAYERS)
    upward = [
        f"{name} ({layer_names[layer_of(name)]}) imports {target} ({layer_names[layer_of(target)]})"
        for name, targets in GRAPH.items()
        if name != "tome_jax"
        for target in targets
        if target == "tome_jax" or layer_of(target) > layer_of(name)
    ]
    assert not upward, "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` as a list of nodes (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_private_name_is_used_across_modules():
    """Helpers shared between modules are public: `module._name` and `from m import _name` fail."""
    offences = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tome_jax"):
                offences += [f"{name}: from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and f"tome_jax.{node.value.id}" in MODULES
                and f"tome_jax.{node.value.id}" != name
            ):
                offences.append(f"{name}: {node.value.id}.{node.attr}")
    assert not offences, "\n".join(offences)


@pytest.mark.parametrize("statement", ["import tome_jax", "import tome_jax.merge, tome_jax.vit, tome_jax.convert"])
def test_import_is_light(statement):
    code = (
        f"import sys; {statement}; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]", f"{statement} imported {result.stdout.strip()}"


def test_no_module_outside_reduce_asks_what_class_a_method_is():
    """Methods say what they need through their hooks; `isinstance(x, reduce.Something)` is
    for `tome_jax.reduce` alone."""
    offences = []
    for name, path in MODULES.items():
        if name.startswith("tome_jax.reduce"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
                classes = ast.unparse(node.args[1])
                if "reduce." in classes or any(c in classes for c in ("Reduction", "DTEM", "DiffRate", "ToMe")):
                    offences.append(f"{name}: isinstance(..., {classes})")
    assert not offences, "\n".join(offences)


def test_the_configs_load_without_tensorflow():
    """absl reads a config before the command loads its model, which must come before
    TensorFlow (see tome_jax.data): the configs name CIFAR-10's normalisation without it."""
    names = sorted(path.stem for path in (PACKAGE / "configs").glob("*.py") if path.stem != "__init__")
    loads = "; ".join(f"importlib.import_module('tome_jax.configs.{name}').get_config()" for name in names)
    code = f"import importlib, sys; {loads}; print(sorted({{'tensorflow', 'torch'}} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]", f"the configs imported {result.stdout.strip()}"


def test_no_function_is_over_60_lines():
    """Long functions hide several concerns; split them (docstrings count)."""
    long = [
        f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for name, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60
    ]
    assert not long, "\n".join(long)
