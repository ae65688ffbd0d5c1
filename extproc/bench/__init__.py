"""On-demand benchmarks (scripts that print numbers; never timed assertions in the tests)."""
