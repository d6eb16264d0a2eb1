"""Rules for the failures of transformers and mixtures of experts, one module per family.

`attention` (logits that grow out of range, entropy that collapses), `logits`
(the output's log Z drifting), `massive` (outlier activations of the repeated
blocks), `experts` (a router that sends its tokens to few experts).  Like every
rule module, pure numpy over a `tbdiag.contract.rundata.RunData`, evaluated
through `tbdiag.rules.evaluator`.
"""
