"""TensorBoard plugin for tbdiag: the Diagnostics tab.

Registered through the ``tensorboard_plugins`` entry point, so a plain
``tensorboard --logdir runs`` shows the tab when a run holds tbdiag data.
Depends on `tbdiag` (schema, rundata, rules); `tbdiag` never imports this.
"""
