"""Embedders: the shared image machinery (shards -> batches -> rows), CLIP and timm image towers, CLIP text."""
