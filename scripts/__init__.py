"""Offline jobs: fine-tune + export, data builders, benchmarks."""
