"""The contract between the two sides: what is stored, and what a decoded run looks like.

`statistics` declares every statistic once, `schema` the byte layout of the
health summaries, `evaluation` that of `add_evaluation`'s confusion matrices,
and `rundata` the decoded run every reader builds and every rule reads.
Imports nothing else from tbdiag, and never torch.
"""
