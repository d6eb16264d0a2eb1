"""One-line integrations with training frameworks, in each framework's own idiom.

- `tbdiag.integrations.lightning.DiagnosticsMonitor`: a Lightning ``Callback``
  (``Trainer(callbacks=[DiagnosticsMonitor(log_every=50)])``).
- `tbdiag.integrations.transformers.DiagnosticsCallback`: a Hugging Face
  ``TrainerCallback`` (``Trainer(..., callbacks=[DiagnosticsCallback(log_every=50)])``).

Both take `tbdiag.DiagnosticWriter.watch`'s keyword arguments and write into the
run directory of the framework's own TensorBoard logger, so the diagnostics sit
next to the framework's scalars.  The submodules are not imported here: each
imports its framework, and tbdiag must not pull either in.
"""
