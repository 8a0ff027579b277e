"""Benchmarks: each module measures one part against a baseline from the same run."""
