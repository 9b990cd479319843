"""Worker-side torch code: loading checkpoints (and their errors), the CLIP vision and text towers, timm
models, the classifier networks, and running a model on a device in batches."""
