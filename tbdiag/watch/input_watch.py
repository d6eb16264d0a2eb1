"""The batch as the model receives it, seen from the watcher's entry hook at a logging step.

The model's forward pre-hook (registered ``with_kwargs``) sees the call's
arguments before the model does.  At the first training forward of a
logging step, `InputWatch.on_logging_forward` adds to the step's probe the
model-level statistics of `tbdiag.measure.inputs`: the scale of the first
floating input (``input_mean``, ``input_std``, ``input_min``, ``input_max``)
and, for a call with token labels and an attention mask, the share of
labelled positions that are padding (``padding_labelled_frac``).  Device
scalars only: nothing is read until the step's one transfer, and nothing
runs between logging steps.  Reads only: the tensors are neither kept nor
modified.
"""

from __future__ import annotations

import torch
from torch import nn

from ..measure import inputs
from ..measure.probe import StepProbe, local, no_autocast

#: The model statistics `input_summary`'s values are stored as, in its order.
INPUT_COLUMNS = ("input_mean", "input_std", "input_min", "input_max")


class InputWatch:
    """Measures a logging step's batch once (the first training forward of the step: one micro-batch)."""

    def __init__(self, model: nn.Module):
        config = getattr(model, "config", None)  # a Hugging Face model's configuration
        self.encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        self._step = -1

    def on_logging_forward(self, probe: StepProbe, args: tuple, kwargs: dict) -> None:
        """The arguments of a logging step's training forward, before the model runs."""
        if probe.step == self._step:
            return
        self._step = probe.step
        x = inputs.floating_input(args, kwargs)
        pair = inputs.labels_and_mask(kwargs, self.encoder_decoder)
        with torch.no_grad():
            if x is not None and x.numel() > 0 and not x.is_meta:
                with no_autocast(x):
                    summary = inputs.input_summary(local(x))
                for k, name in enumerate(INPUT_COLUMNS):
                    probe.add_model(name, summary[k])
            if pair is not None and not pair[0].is_meta:
                probe.add_model("padding_labelled_frac", inputs.padding_share(*pair))
