"""The benchmarks: each module's `main(argv)` prints its tables (`pictoprompt bench NAME` or
`python -m lab.benchmarks.NAME`), judging with the `shapes` oracle, never with a model it is measuring."""
