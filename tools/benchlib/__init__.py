"""The benchmark harness behind tools/bench (issue #6); see docs/performance.md."""
