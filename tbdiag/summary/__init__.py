"""Encoders: measured numbers in, TensorBoard summaries and event-file records out.

Pure builders (numpy, PIL, protobuf), like ``torch.utils.tensorboard.summary``:
the health table's `assembly`, `histograms`, activation `images`, the
`confusion_image` and `evaluation_inputs` of ``add_evaluation``, and a faster
record writer (`recordio`).  Imports `tbdiag.contract` only; no torch import.
"""
