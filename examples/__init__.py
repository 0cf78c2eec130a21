"""Examples of token merging inside other people's Flax models (run with `python -m examples.NAME`)."""
