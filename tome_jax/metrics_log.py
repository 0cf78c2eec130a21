"""A training run's metrics log: stdout, `metrics.jsonl`, TensorBoard; trimmed on resume.

Not clu's metric writers: importing them needs the tensorboard package and loads
TensorFlow (which must follow a timm model, see tome_jax.data), they write no
JSON lines, and their logging writer goes to absl's log, which the commands keep
at warnings.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib


class MetricWriter:
    """Metrics to stdout and `metrics.jsonl` (process 0), and to TensorBoard event
    files when the tensorboard package is installed."""

    def __init__(self, workdir, enabled: bool = True):
        self.enabled = enabled
        self._file = None
        self._summary = None
        if enabled:
            path = pathlib.Path(workdir)
            path.mkdir(parents=True, exist_ok=True)
            self._file = open(path / "metrics.jsonl", "a")
            if importlib.util.find_spec("tensorboard") is not None:
                import tensorflow as tf

                self._tf = tf
                self._summary = tf.summary.create_file_writer(str(path / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float | list[str]], prefix: str) -> None:
        """One record; numbers are floats, lists (e.g. names of skipped images) kept."""
        if not self.enabled:
            return
        values = {f"{prefix}/{k}": v if isinstance(v, list) else float(v) for k, v in metrics.items()}
        record = {"step": step, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._summary is not None:
            with self._summary.as_default(step=step):
                for key, value in record.items():
                    if key != "step" and isinstance(value, float):
                        self._tf.summary.scalar(key, value)
            self._summary.flush()
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        print(f"step {step}: {text}", flush=True)

    def close(self):
        if self._file:
            self._file.close()
        if self._summary is not None:
            self._summary.close()


def drop_metrics_after(path: pathlib.Path, step: int) -> None:
    """Keeps the rows of a `metrics.jsonl` up to `step`: a run resumed from the
    checkpoint of `step` redoes the steps after it and logs them again. A line cut
    short by a kill is dropped too."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)

    def logged_step(line: str) -> float:
        try:
            return json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return math.inf

    kept = [line for line in lines if line.endswith("\n") and logged_step(line) <= step]
    if len(kept) < len(lines):
        partial = path.with_name(path.name + ".partial")
        partial.write_text("".join(kept))
        partial.replace(path)
