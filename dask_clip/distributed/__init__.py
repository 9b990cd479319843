"""Cluster start-up and the per-worker model cache."""
