"""The token-reduction method a command's config names, checked before anything loads.

eval.py, train.py and the step-time comparison read `config.method` (a
comparison: `config.methods` and `config.budget_method`) and each method's
settings under its name, `config.<method>.<setting>`. A config holds every
method's defaults, so that any of them can be set on the command line; a
setting changed for a method that does not run would be ignored, so it is an
error, as is an option only another method reads (`metric_layers`: DTEM's).
"""

from __future__ import annotations

from typing import Any

from tome_jax import reduce


def compared(config) -> list[str]:
    """The methods a comparison evaluates (`config.methods`, names separated by commas)."""
    return [name.strip() for name in config.methods.split(",") if name.strip()]


def methods_run(config) -> list[str]:
    """The methods a run builds: a comparison's `methods` and its `budget_method`, else `method`."""
    if config.get("methods"):
        return list(dict.fromkeys([*compared(config), config.budget_method]))
    return [config.get("method", "tome")]


def check(config) -> None:
    """Raises ValueError, one line naming the config key, for a method name that does not exist,
    a setting of the wrong type or out of its range (`reduce.check_settings`), a setting changed
    for a method the run does not build, and DTEM metric layers without DTEM."""
    run = methods_run(config)
    key = "methods" if config.get("methods") else "method"
    unknown = [name for name in run if name not in reduce.METHODS]
    if unknown:
        raise ValueError(f"config.{key} names {', '.join(unknown)}; known: {', '.join(reduce.METHODS)}")
    for name, defaults in reduce.default_settings().items():
        given = config[name].to_dict() if name in config else {}
        if name in run:
            reduce.check_settings(reduce.METHODS[name], given, prefix="config.")
            continue
        changed = [(setting, value) for setting, value in given.items() if value != defaults.get(setting)]
        if changed:
            setting, value = changed[0]
            raise ValueError(
                f"config.{name}.{setting}={value!r} is a setting of {name}, but the run's config.{key} is "
                f"{', '.join(run)}: set --config.{key}={name}, or leave the setting out"
            )
    if config.get("metric_layers"):
        if "dtem" not in run:
            raise ValueError(
                f"config.metric_layers={config.metric_layers!r} holds DTEM metric layers, which only DTEM reads, "
                f"but config.{key} is {', '.join(run)}: set --config.{key}=dtem"
            )
        if not config.pretrained:
            raise ValueError(
                "config.metric_layers adds metric layers to the loaded weights, but config.pretrained=False "
                "loads none: drop one of the two"
            )


def reduction(config, name: str | None = None) -> reduce.Reduction:
    """The method `name` names (default `config.method`, else "tome") with its settings from
    `config[name]` when the config has that entry (e.g. `--config.pitome.margin=0.5`)."""
    name = name or config.get("method", "tome")
    settings = config.get(name) if name in reduce.METHODS else None
    return reduce.create(name, **(settings.to_dict() if settings is not None else {}))


def described(method: reduce.Reduction) -> dict[str, Any]:
    """What a run's results record of its method: its name and every setting."""
    return {"method": method.name, "settings": method.settings}


def settings_text(method: reduce.Reduction) -> str:
    """The method's settings on one line, `margin=0.75, alpha=1.0, bipartite_share=0.5` ("-": none)."""
    return ", ".join(f"{key}={value!r}" for key, value in method.settings.items()) or "-"
