"""Timing helpers for the bench scripts; they live in the package (`regrad.bench.timing`), shared with
`regrad bench`."""

from __future__ import annotations

from regrad.bench.timing import machine, median_seconds, peak_traced_bytes, timed_runs

__all__ = ["machine", "median_seconds", "peak_traced_bytes", "timed_runs"]
