"""Image embedders: a shared base (shards -> batches -> rows) and the CLIP vision tower."""
