"""The laboratory beside the product: how the bundled `shapes` set was trained and how every method is judged.

Not part of the `pictoprompt` wheel. A checkout installs it for development (`pip install -e ./lab`, which
`make install` runs): the shapes world's training (`lab.shapes.train`), its sampling and language
(`lab.shapes.world`), the oracle that judges pictures and prompts without a model (`lab.shapes.oracle`), the
real-size builders (`lab.real_size`), the tiny test LM (`lab.tiny_lm`) and the benchmarks (`lab.benchmarks`, run with
`pictoprompt bench NAME`). Results, each with the command that produced it, are in `lab/RESULTS.md` and
`lab/results/`.
"""
