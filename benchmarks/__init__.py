"""Benchmarks: each prints a table comparing us side by side with a named baseline in one run (docs/benchmarks.md);
`baselines/` holds the PEFT servers they compare with, `cluster/` the replica profile and the scale-out simulation."""
