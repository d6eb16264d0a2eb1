"""The read path: event files in, decoded runs and findings out, for ``tbdiag report``.

`reader` loads a logdir with TensorBoard's own loader into `RunData`;
`report` runs the rules on it and renders text or JSON.  Imports `rules` and
`contract` only, never torch or the training side (TensorBoard's plugin shares
everything after the bytes).
"""
