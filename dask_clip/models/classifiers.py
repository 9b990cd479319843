"""The torch modules of the LAION embedding classifiers and loading their checkpoints safely.

Both take CLIP ViT-L/14 image embeddings (``float32 (B, 768)``) and give ``float32 (B, 1)``; their
parameter names match the published checkpoints, so those state dicts load as they are.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from dask_clip.errors import CheckpointError


class AestheticMlp(nn.Module):
    """LAION's improved aesthetic predictor (v2): an MLP, ``(B, D)`` -> score ``(B, 1)``, about 0 to 10.

    Parameters ``layers.0`` ... ``layers.7`` as in ``sac+logos+ava1-l14-linearMSE.pth``.
    """

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


class Standardize(nn.Module):
    """Keras ``Normalization``: ``(x - mean) / max(sqrt(variance), 1e-7)`` with stored ``mean`` and ``variance``."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("variance", torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / torch.sqrt(self.variance).clamp_min(1e-7)


class NsfwMlp(nn.Module):
    """LAION's CLIP-based NSFW detector for ViT-L/14 (the Keras model ``clip_autokeras_binary_nsfw``).

    Standardisation, then Dense 64, 512, 256 (ReLU) and Dense 1 (sigmoid): ``(B, D)`` -> probability
    ``(B, 1)`` that the image is NSFW. Parameters ``norm.mean``, ``norm.variance``, ``linear_1`` ...
    ``linear_4``, as in LAION's own PyTorch port of the Keras weights.
    """

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.norm = Standardize(input_size)
        self.linear_1 = nn.Linear(input_size, 64)
        self.linear_2 = nn.Linear(64, 512)
        self.linear_3 = nn.Linear(512, 256)
        self.linear_4 = nn.Linear(256, 1)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        x = self.norm(embeddings)
        x = torch.relu(self.linear_1(x))
        x = torch.relu(self.linear_2(x))
        x = torch.relu(self.linear_3(x))
        return torch.sigmoid(self.linear_4(x))


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from ``*.safetensors`` or a torch file (``torch.load(weights_only=True)``: tensors only)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"classifier checkpoint {path!r} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable or unsafe file
        raise CheckpointError(
            f"cannot load classifier checkpoint {path!r} (a safetensors file or a torch state dict of tensors "
            f"saved with torch.save, loaded with weights_only=True): {type(error).__name__}: {error}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path!r} does not hold a state dict (a mapping of names to tensors)")
    return state


def load_classifier(module: nn.Module, path: str) -> nn.Module:
    """``module`` with the weights of ``path`` (every parameter, exactly), in eval mode."""
    state = read_state_dict(path)
    expected = module.state_dict()
    for name in ("norm.mean", "norm.variance"):  # Keras stores these as (1, D)
        if name in state and name in expected and state[name].numel() == expected[name].numel():
            state[name] = state[name].reshape(expected[name].shape)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path!r} does not fit {type(module).__name__}: {error}") from None
    return module.eval()
