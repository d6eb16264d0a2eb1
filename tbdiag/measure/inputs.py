"""What a training batch looks like as it enters the model: its scale, and the padding its labels count.

Two measurements of the model's call, as pure tensor functions (device
scalars, no host read: they ride in the logging step's one transfer):

``input_summary``
    ``[mean, std, min, max]`` of the model's first floating input (pixels,
    features, embeddings, audio).  A network built for normalised inputs fed
    0-255 pixels or raw regression features sees values a hundred times
    larger than its initialisation assumes; the layer statistics only show the
    consequence (dead ReLUs, exploding gradients) steps later.  Integer token
    ids are not floating and are skipped, and so are the call's masks, labels
    and positions (`INPUT_SKIPPED`): they are not what the network reads.
``padding_share``
    Of the label positions the loss counts (not the ignore index, -100), the
    share whose attention mask is 0: padding the loss is asked to predict (a
    padding collator used for a language model without masking its labels).
    Hugging Face models take ``labels`` and ``attention_mask`` (the decoder's
    ``decoder_attention_mask`` for encoder-decoder models), so the batch
    says it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from . import stats

#: The label value Hugging Face models and ``torch.nn.CrossEntropyLoss`` leave out of the loss.
IGNORE_INDEX = -100

#: Keyword arguments that are not the data the network reads (masks, labels, positions, caches, timesteps, the
#: Hugging Face Trainer's ``num_items_in_batch``), recognised by these parts of their names.
INPUT_SKIPPED = ("mask", "label", "position", "ids", "past_key_values", "cache", "timestep", "num_items")


def floating_input(args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """The model's first floating input: the first floating tensor among the positional arguments, else among
    the keyword arguments that are data (not `INPUT_SKIPPED`); None when the model reads only integers.
    A 0-dimensional tensor is a setting (a count, a temperature), not a batch."""
    for a in args:
        if _batch(a):
            return a
    for name, value in kwargs.items():
        if _batch(value) and not any(part in name.lower() for part in INPUT_SKIPPED):
            return value
    return None


def _batch(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 0


def input_summary(x: torch.Tensor) -> torch.Tensor:
    """``[mean, std, min, max]`` of ``x`` in float32, on its device, with no host read.

    A large input (video, long audio) is reduced in `stats.pieces`: each
    float32 copy is of one piece, so the memory it takes stays bounded.
    """
    x = x.detach()
    n = x.numel()
    parts = stats.pieces(x)
    mean = torch.stack([p.sum(dtype=torch.float32) for p in parts]).sum() / n
    sq = torch.stack([torch.linalg.vector_norm(p.float() - mean) ** 2 for p in parts]).sum()
    lo = torch.stack([p.amin().float() for p in parts]).amin()
    hi = torch.stack([p.amax().float() for p in parts]).amax()
    return torch.stack([mean, torch.sqrt(sq / n), lo, hi])


def labels_and_mask(kwargs: Mapping[str, Any], encoder_decoder: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The call's token labels and the attention mask of the same positions, or None when it has no such pair.

    The mask must have the labels' shape: a sequence classifier's ``[batch]``
    labels have no positions to pad.  An encoder-decoder model's
    ``attention_mask`` is the encoder's: its labels are the decoder's, masked
    by ``decoder_attention_mask`` if any.
    """
    labels = kwargs.get("labels")
    mask = kwargs.get("decoder_attention_mask" if encoder_decoder else "attention_mask")
    if not isinstance(labels, torch.Tensor) or not isinstance(mask, torch.Tensor):
        return None
    if labels.is_floating_point() or labels.dim() < 2 or labels.shape != mask.shape:
        return None
    return labels, mask


def padding_share(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of the labelled positions (labels not `IGNORE_INDEX`) whose attention mask is 0; NaN with none
    labelled.  A float32 device scalar."""
    if mask.device != labels.device:  # (a model split over devices; a copy between them, not to the host)
        mask = mask.to(labels.device, non_blocking=True)
    labelled = labels != IGNORE_INDEX
    padded = labelled & (mask == 0)
    return padded.sum(dtype=torch.float32) / labelled.sum(dtype=torch.float32)


__all__ = ["IGNORE_INDEX", "INPUT_SKIPPED", "floating_input", "input_summary", "labels_and_mask", "padding_share"]
