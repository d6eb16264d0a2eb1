"""What one logging step measures, on the model's own device, up to its single host transfer.

The model described (`layers`, `modelinfo`, `graph`, `run_facts`), the
statistics as pure tensor functions (`stats`; the batch's scale and
labelled padding: `inputs`), the step's `probe`, the optimizer's Adam state
against its eps (`optimizer_state`), the output's log Z (`logits`), and the
pooling of measurements across ranks (`distributed`).  Imports torch and
`tbdiag.contract` only: the hooks that call it live in `tbdiag.watch`.
"""
