"""`python -m tome_jax eval|train|bench|vis [...]`, the console scripts by another name."""

from tome_jax import cli

cli.main()
