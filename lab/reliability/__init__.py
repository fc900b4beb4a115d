"""Reliability runs of issue 39: schema fuzzing of every tool, and the soak (`lab/results/reliability.md`)."""
