"""Load a `clickscore train` folder back into a model, refusing anything inconsistent.

    model, artefacts, info = load_checkpoint("runs/gru")
    info["model_kind"], info["config"], info["best_valid"], info["vocab_hash"]

The model is rebuilt from the config stored in the checkpoint (never from defaults)
and put in eval mode on the CPU. Every failure is a ClickscoreError that says what
differs: a missing or corrupt file, a config that does not match its state_dict
("item embedding has 5002 rows in the state_dict but config says 3002"), or a
features.json from another vocabulary than the one the weights were trained on.
"""
from __future__ import annotations

from pathlib import Path

import torch

from stream.errors import ClickscoreError
from stream.features import ArtefactError, FeatureArtefacts
from training.models import MODEL_KINDS, build_model, config_from_dict

CHECKPOINT_FILE = "checkpoint.pt"
FEATURES_FILE = "features.json"
REQUIRED_KEYS = ("model_kind", "config", "state_dict", "train")

# state_dict key -> (what a person calls it, what its first dimension counts)
_NAMES = {
    "embedding.item.weight": ("item embedding", "rows"),
    "embedding.category.weight": ("category embedding", "rows"),
    "embedding.event_type.weight": ("event-type embedding", "rows"),
    "embedding.hour.weight": ("hour embedding", "rows"),
    "embedding.weekday.weight": ("weekday embedding", "rows"),
    "embedding.month.weight": ("month embedding", "rows"),
    "embedding.week.weight": ("week embedding", "rows"),
    "heads.item_bias": ("next-item output bias", "entries"),
}


class CheckpointError(ClickscoreError):
    """A checkpoint folder that is missing, corrupt or inconsistent."""


def _describe_mismatch(key: str, stored: torch.Size, expected: torch.Size) -> str:
    if key in _NAMES and len(stored) == len(expected) and stored[1:] == expected[1:]:
        label, unit = _NAMES[key]
        return f"{label} has {stored[0]} {unit} in the state_dict but config says {expected[0]}"
    label = _NAMES.get(key, (key, ""))[0]
    return f"{label} ({key}) has shape {tuple(stored)} in the state_dict but config gives {tuple(expected)}"


def load_checkpoint(folder: str | Path) -> tuple[torch.nn.Module, FeatureArtefacts, dict]:
    """(model in eval mode on CPU, feature artefacts, info).

    info = the checkpoint's "train" dict (args, seed, epochs, best_valid, dataset,
    vocab_hash, ...) plus "model_kind" and "config" (a dict, as stored).
    """
    folder = Path(folder)
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: --checkpoint must be a folder written by "
                              "`clickscore train` (checkpoint.pt, features.json)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a truncated/garbled file
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt or truncated?): "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a clickscore checkpoint")
    missing = [k for k in REQUIRED_KEYS if k not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; it was not written by `clickscore train`")
    kind = checkpoint["model_kind"]
    if kind not in MODEL_KINDS:
        raise CheckpointError(f"{path}: model_kind {kind!r} is not one of {sorted(MODEL_KINDS)}")
    try:
        config = config_from_dict(kind, checkpoint["config"])
    except (TypeError, ValueError, AssertionError) as exc:
        raise CheckpointError(f"{path}: its {kind} config is invalid: {exc}") from None
    info = dict(checkpoint["train"])
    info.update(model_kind=kind, config=dict(checkpoint["config"]))

    try:
        artefacts = FeatureArtefacts.load(folder / FEATURES_FILE)
    except ArtefactError as exc:
        raise CheckpointError(f"{folder}: {exc}") from None
    problems = []
    trained_hash = info.get("vocab_hash")
    if trained_hash is not None and trained_hash != artefacts.vocab_hash:
        problems.append(f"{FEATURES_FILE} has vocab_hash {artefacts.vocab_hash} but the weights were "
                        f"trained with vocabulary {trained_hash} (features.json from another training run)")
    if config.n_items != artefacts.n_items:
        problems.append(f"config says {config.n_items} item indices but {FEATURES_FILE} has {artefacts.n_items}")
    if config.n_categories != artefacts.n_categories:
        problems.append(f"config says {config.n_categories} category indices but {FEATURES_FILE} "
                        f"has {artefacts.n_categories}")
    if config.window != artefacts.window:
        problems.append(f"config window {config.window} but {FEATURES_FILE} window {artefacts.window}")

    model = build_model(kind, config)
    expected = model.state_dict()
    stored = checkpoint["state_dict"]
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path}: state_dict is a {type(stored).__name__}, not a dict of tensors")
    for key, tensor in expected.items():
        if key not in stored:
            problems.append(f"state_dict lacks {key}")
        elif tuple(stored[key].shape) != tuple(tensor.shape):
            problems.append(_describe_mismatch(key, stored[key].shape, tensor.shape))
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:
        problems.append(f"state_dict has keys the {kind} config does not build: {unexpected[:5]}")
    if problems:
        raise CheckpointError(f"{folder} is inconsistent: " + "; ".join(problems))
    model.load_state_dict(stored)
    model.eval()
    return model, artefacts, info
