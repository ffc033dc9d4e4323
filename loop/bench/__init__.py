"""Benchmarks that print figures: `loop bench proxy` (this package), `loop bench ingest` (feedback)."""
