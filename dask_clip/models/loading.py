"""Reading a model folder (a local ``save_pretrained`` directory or a hub id): its JSON files, its weights
and its tokenizer, with errors that say how to provide what is missing."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

from dask_clip.errors import ModelLoadError

HOW_TO_PROVIDE_WEIGHTS = (
    "Give model_dir a hub id this machine can download, or a local directory written by "
    "CLIPModel.save_pretrained (with its image processor's preprocessor_config.json): on a machine "
    "with network, `huggingface-cli download openai/clip-vit-large-patch14 --local-dir DIR`, then copy DIR."
)
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
"""Weights transformers loads with ``use_safetensors=True``: one file, or the index of a sharded checkpoint."""


def is_local_path(model_dir: str) -> bool:
    """Whether ``model_dir`` names a local folder (an existing one, or one spelled as a path) rather than a hub id."""
    return os.path.isdir(os.path.expanduser(model_dir)) or model_dir.startswith(("/", "./", "../", "~"))


def resolved_model_path(model: str) -> str:
    """``model`` as it is recorded and loaded: a local folder or file as its real absolute path (``~``, ``..``,
    symbolic links and a trailing slash resolved), so that every spelling of one model is one identity, and a
    worker with another working directory finds it; a hub id (or timm name) unchanged."""
    expanded = os.path.expanduser(model)
    return os.path.realpath(expanded) if is_local_path(model) or os.path.exists(expanded) else model


def read_model_json(model_dir: str, filename: str) -> dict[str, Any]:
    """A JSON file of ``model_dir`` (local directory or hub id), as a dict; ``ModelLoadError`` if absent."""
    from transformers.utils import cached_file

    if is_local_path(model_dir) and not os.path.isdir(os.path.expanduser(model_dir)):
        raise ModelLoadError(f"model directory {model_dir!r} does not exist.\n{HOW_TO_PROVIDE_WEIGHTS}")
    try:
        path = cached_file(model_dir, filename)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"cannot read {filename} of model {model_dir!r}: {error}\n{HOW_TO_PROVIDE_WEIGHTS}"
        ) from None
    if path is None:
        raise ModelLoadError(f"model {model_dir!r} has no {filename}.\n{HOW_TO_PROVIDE_WEIGHTS}")
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{filename} of model {model_dir!r} is not readable JSON: {error}") from None


def check_safetensors_weights(model_dir: str) -> None:
    """For a local folder: ``ModelLoadError`` unless it holds safetensors weights (pickled checkpoints such as
    ``pytorch_model.bin`` are never loaded). A hub id is checked where its weights are loaded."""
    if not is_local_path(model_dir):
        return
    folder = os.path.expanduser(model_dir)
    if any(os.path.isfile(os.path.join(folder, name)) for name in SAFETENSORS_FILES):
        return
    present = sorted(name for name in os.listdir(folder) if name.endswith((".bin", ".pt", ".pth", ".safetensors")))
    raise ModelLoadError(
        f"model directory {model_dir!r} has no safetensors weights ({' or '.join(SAFETENSORS_FILES)}); "
        f"weight files present: {present or 'none'} (only safetensors files are accepted, never pickled "
        f"checkpoints).\n{HOW_TO_PROVIDE_WEIGHTS}"
    )


def file_version(path: str) -> dict[str, int]:
    """A local file's size and modification time (ns): what changes when the file is replaced."""
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def model_version(model_dir: str) -> dict[str, Any]:
    """What identifies the weights a model id names, so that replacing them invalidates what they produced:
    for a local folder, the size and modification time of its JSON and safetensors files; for a hub id, the
    revision (commit) its cached files come from."""
    if is_local_path(model_dir):
        folder = os.path.expanduser(model_dir)
        names = sorted(n for n in os.listdir(folder) if n.endswith((".json", ".safetensors", ".txt", ".model")))
        return {"files": {name: file_version(os.path.join(folder, name)) for name in names}}
    from transformers.utils import cached_file

    path = cached_file(model_dir, "config.json")
    parts = os.path.normpath(path).split(os.sep) if path else []
    revision = parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None
    return {"revision": revision}


def same_weights(recorded: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether ``current`` (``model_version`` now) names the weights that ``recorded`` (an earlier one) named: for a
    local folder, every file recorded is there unchanged (a file added since, such as a tokenizer, does not
    count); for a hub id, the same revision."""
    if "files" in recorded and "files" in current:
        return all(current["files"].get(name) == version for name, version in recorded["files"].items())
    return recorded == current


def has_tokenizer_files(model_dir: str) -> bool:
    """Whether ``model_dir`` (local folder or hub id) has a tokenizer: ``tokenizer.json``, ``vocab.json`` (CLIP's
    BPE) or a SentencePiece model (SigLIP's ``spiece.model``, Gemma's ``tokenizer.model``)."""
    from transformers.utils import cached_file

    for name in ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model"):
        try:
            if cached_file(model_dir, name) is not None:
                return True
        except (OSError, ValueError):
            continue
    return False


def check_tokenizer_files(model_dir: str) -> None:
    """``ModelLoadError`` unless ``model_dir`` has tokenizer files: without them transformers would build an
    empty tokenizer (every word unknown) without a word of warning."""
    if not has_tokenizer_files(model_dir):
        raise ModelLoadError(
            f"cannot load the tokenizer of {model_dir!r}: it has no tokenizer files (neither tokenizer.json, "
            f"vocab.json nor a SentencePiece model)\n{HOW_TO_PROVIDE_WEIGHTS}"
        )


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars (a full CLIP's unused weights are expected)."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def load_pretrained(model_class: Any, model_dir: str, what: str, **options: Any) -> Any:
    """``model_class.from_pretrained(model_dir, **options)`` from safetensors weights only, quietly;
    ``ModelLoadError`` naming ``what`` (e.g. "CLIP vision tower") when it cannot be loaded."""
    try:
        with quiet_transformers():
            return model_class.from_pretrained(model_dir, use_safetensors=True, **options)
    except Exception as error:  # noqa: BLE001 - whatever fails while loading weights means "cannot load"
        raise ModelLoadError(
            f"cannot load the {what} of {model_dir!r} (only safetensors files are accepted, never pickled "
            f"checkpoints): {type(error).__name__}: {error}\n{HOW_TO_PROVIDE_WEIGHTS}"
        ) from None
