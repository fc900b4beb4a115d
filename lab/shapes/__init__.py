"""The `shapes` world's laboratory: its sampling and captions, its oracle, and the training of the bundled set."""
