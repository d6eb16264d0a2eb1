"""The per-layer statistics tbdiag records, each declared once.

Every fact about a statistic lives in its `Statistic` row: what it measures,
how people name it, how a chart or a colour scale should treat it, and where
the Diagnostics tab shows it.  The summary format (`tbdiag.contract.schema` derives its
column order from `STATISTICS`), the rules (which name the statistics they
read), the report and the tab (which receives this table from the plugin's
``/rules`` route) all refer to a statistic by its name and look the rest up
here, so adding a statistic means adding one row.

Torch-free and numpy-free: readers import it without the training stack.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

#: Colour and axis scales: ``log`` spans decades (norms, ratios), ``fraction``
#: is 0..1, ``linear`` is anything else.
SCALES: tuple[str, ...] = ("log", "fraction", "linear")

#: When the drill-down draws a statistic's chart (only ever when it holds a
#: measured value): ``always``; ``nonzero`` -- only when some value is not 0
#: (NaN/Inf counts: a chart of zeros says nothing); ``with_finding`` -- only
#: when a finding on the layer comes from a rule that reads it (quantities
#: with no healthy range of their own); ``never`` (bookkeeping columns).
CHARTS: tuple[str, ...] = ("always", "nonzero", "with_finding", "never")


@dataclass(frozen=True)
class Statistic:
    """One per-layer statistic: one column of every health tensor."""

    name: str
    meaning: str  # one line: what is measured
    label: str  # human label (chart titles, heatmap, tooltips)
    short: str  # short header for the layer table
    scale: str  # one of SCALES
    chart: str  # one of CHARTS
    key_column: int | None = None  # position among the layer table's key columns; None: not one of them
    #: The statistic counting NaN/Inf in what this one is computed from (the layer's output, its
    #: gradients, its weights).  Where that count is above 0, a NaN here is the value NaN; elsewhere NaN
    #: means "not measured".  None: a NaN is always "not measured".
    nonfinite_count: str | None = None
    #: Measured only on layers whose output this kind of activation consumes (`activation_family`):
    #: "rectifier", "saturating", or "" for every layer.  A layer it does not apply to has no value, not
    #: even the value NaN when its output turns NaN.
    consumed_by: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# fmt: off
#: In the column order of every health tensor.  Event files name their columns,
#: but keep this order: new statistics go at the end.
STATISTICS: tuple[Statistic, ...] = (
    Statistic("act_mean", "mean of the layer's output over the batch",
              "activation mean", "act mean", "linear", "with_finding", nonfinite_count="act_nonfinite"),
    Statistic("act_std", "standard deviation of the layer's output over the batch",
              "activation std", "act std", "log", "always", key_column=4, nonfinite_count="act_nonfinite"),
    Statistic("act_nonfinite", "count of NaN/Inf elements in the layer's output",
              "NaN/Inf in activations", "act NaN/Inf", "linear", "nonzero"),
    Statistic("dead_frac", "fraction of units (conv channels, linear features) a rectifier-like activation (ReLU, "
              "ReLU6, LeakyReLU(0), clamp(min=0), GELU, SiLU, ...) never fired for over the batch: output 0, or "
              "for a smooth one a pre-activation below its cutoff (output and derivative ~0); NaN when none "
              "consumes the output, or when the output held NaN/Inf",
              "dead units (ReLU, GELU, SiLU, ...)", "dead units", "fraction", "always", key_column=2,
              nonfinite_count="act_nonfinite", consumed_by="rectifier"),
    Statistic("saturated_frac", "fraction of sigmoid/tanh outputs within 1% of their bounds; NaN when none "
              "consumes the output",
              "saturated sigmoid/tanh outputs", "saturated", "fraction", "always", key_column=3,
              consumed_by="saturating"),
    Statistic("grad_norm", "L2 norm of the gradients of the layer's own parameters",
              "gradient L2 norm", "grad norm", "log", "never", nonfinite_count="grad_nonfinite"),
    Statistic("grad_rms", "grad_norm / sqrt(number of gradient elements)",
              "gradient RMS", "grad RMS", "log", "always", key_column=0, nonfinite_count="grad_nonfinite"),
    Statistic("grad_nonfinite", "count of NaN/Inf gradient elements",
              "NaN/Inf in gradients", "grad NaN/Inf", "linear", "nonzero"),
    Statistic("weight_norm", "L2 norm of the layer's own parameters",
              "weight L2 norm", "weight norm", "log", "with_finding", nonfinite_count="weight_nonfinite"),
    Statistic("weight_nonfinite", "count of NaN/Inf parameter elements",
              "NaN/Inf in weights", "weight NaN/Inf", "linear", "nonzero"),
    Statistic("update_ratio", "||w_after - w_before|| / ||w_after|| over the optimizer step (needs optimizer=); "
              "for a parameter over 65,536 elements the change is measured on a fixed strided sample of that "
              "many and scaled (error under 1% on dense updates, docs/performance.md)",
              "update / weight ratio", "update / weight", "log", "always", key_column=1,
              nonfinite_count="weight_nonfinite"),
    Statistic("changed", "fraction of the layer's gradient-receiving parameter tensors that changed since the "
              "previous logging step",
              "parameters changed since last log", "changed", "fraction", "with_finding"),
    Statistic("grad_params", "number of the layer's parameter tensors that received a gradient this step",
              "parameter tensors with gradients", "grad tensors", "linear", "with_finding"),
    Statistic("dead_persist_frac", "fraction of units that fired neither in this batch nor in the two previous "
              "logged ones; NaN when the output held NaN/Inf",
              "ReLU units dead for 3 logged batches", "dead 3 batches", "fraction", "never",
              nonfinite_count="act_nonfinite", consumed_by="rectifier"),
    Statistic("eps_dominated_frac", "under an Adam-family optimizer (Adam, AdamW, NAdam, RAdam; not SGD, Adafactor "
              "or Adagrad), the share of the layer's coordinates that received a gradient this step whose "
              "sqrt(v_hat) (bias-corrected exp_avg_sq, max_exp_avg_sq with amsgrad) is below the optimizer's eps: "
              "there the update no longer follows the gradient (it shrinks with it); read from optimizer.state "
              "after the step, on a fixed strided sample of 65,536 elements for larger parameters; NaN for other "
              "optimizers",
              "Adam updates dominated by eps", "eps-dominated", "fraction", "nonzero"),
    Statistic("spike_grad_norm", "L2 norm of the layer's gradients at grad_spike_step, the step since the previous "
              "logging step whose global gradient norm jumped most against the last 128 steps (any step, measured "
              "before clipping); on a CPU, a larger gradient's norm is estimated from a fixed sample of 4,096 of "
              "its elements (tbdiag.measure.sampled_norms: within 50% per layer, 12% for the global norm); NaN "
              "before the tracker has history",
              "gradient norm at the spike step", "spike grad", "log", "with_finding"),
    Statistic("spike_grad_typical", "the layer's usual gradient norm before that step: the median over the last 128 "
              "steps of the same measure as spike_grad_norm, so that the two compare like with like (sampled "
              "alike on a CPU); NaN before the tracker has history",
              "usual gradient norm before the spike", "usual grad", "log", "with_finding"),
    Statistic("expert_top_share", "share of the tokens a mixture-of-experts router sends to its busiest expert "
              "(among each token's top-k choices): top_k / num_experts when balanced, 1 when every token picks it "
              "(OLMo-core's load imbalance, max / mean load, is this x num_experts / top_k); NaN for layers that "
              "are not routers",
              "busiest expert's share of tokens", "top expert", "fraction", "with_finding"),
    Statistic("experts_idle_frac", "fraction of a router's experts that received no token in the batch; NaN for "
              "layers that are not routers",
              "experts with no tokens", "idle experts", "fraction", "with_finding"),
    Statistic("attn_logit_max", "largest attention logit (the softmax input q.k x the model's own scale, plus any "
              "additive bias) a sampled query row gives a key it attends, over every head; an attention module's "
              "row, NaN elsewhere (tbdiag.measure.attention: a few batch items x up to 32 query rows x every key)",
              "max attention logit", "max logit", "linear", "always"),
    Statistic("attn_logit_head", "the head (0-based) holding attn_logit_max",
              "head of the max attention logit", "logit head", "linear", "never"),
    Statistic("attn_entropy", "mean over heads and sampled query rows of the attention entropy divided by ln(keys "
              "attended): 1 is uniform attention, 0 one-hot (rows attending one key left out)",
              "attention entropy (normalised)", "attn entropy", "fraction", "always"),
    Statistic("attn_entropy_min", "the lowest head's mean normalised attention entropy",
              "lowest head's attention entropy", "min head entropy", "fraction", "with_finding"),
    Statistic("attn_entropy_head", "the head (0-based) with the lowest attention entropy",
              "head of the lowest entropy", "entropy head", "linear", "never"),
    Statistic("attn_sink", "mean share of attention the sampled query rows give the first key (the 'attention "
              "sink')",
              "attention on the first key", "attn sink", "fraction", "with_finding"),
)
# fmt: on

# fmt: off
#: Model-level statistics: one value per logging step for the whole model (not per layer), stored in
#: their own tensor (`tbdiag.contract.schema.encode_model`) and read by the rules as series (`RunData.model`).
#: Columns are read by name; new ones go at the end.
MODEL_STATISTICS: tuple[Statistic, ...] = (
    Statistic("nonfinite_step", "first training step (any step, not only logging steps) where NaN/Inf was born, "
              "from the sentinel's check of the model output at every step (tbdiag.watch.sentinel); NaN while there was "
              "none",
              "first non-finite step", "NaN step", "linear", "never"),
    Statistic("nonfinite_layer", "layer row (model order) where NaN/Inf first appeared at that step: the first "
              "in forward order with a non-finite output, or for nonfinite_where=backward the first in backward "
              "order with non-finite weights; NaN when it could not tell",
              "first non-finite layer", "NaN layer", "linear", "never"),
    Statistic("eval_mode_steps", "optimizer steps since the previous logging step taken while the model was in "
              "eval() mode and ran no training forward",
              "optimizer steps in eval mode", "eval steps", "linear", "nonzero"),
    Statistic("stale_gradients", "1 when the gradients were not cleared between the previous optimizer step and "
              "this one (they accumulate across steps), 0 when they were, checked on one small parameter; NaN "
              "when not checked",
              "gradients not cleared", "stale grads", "linear", "nonzero"),
    Statistic("softmax_output", "1 when the model's output rows are probability distributions (non-negative, "
              "summing to 1) where a loss expects logits, 0 otherwise",
              "output already softmaxed", "softmax out", "linear", "nonzero"),
    Statistic("nonfinite_where", "where the sentinel saw NaN/Inf born: 0 in the forward (a layer's output), 1 in "
              "the backward or the optimizer update (the weights), 2 in the model's input; NaN when unknown",
              "where NaN/Inf was born", "NaN where", "linear", "never"),
    Statistic("lr_max", "the largest learning rate among the optimizer's param groups at this step: where it "
              "stands against its peak tells a warm-up or a decayed schedule tail from a learning rate set too low",
              "learning rate (largest group)", "lr", "log", "never"),
    Statistic("lr_initial", "the largest learning rate the optimizer was configured with, as a torch LR scheduler "
              "records it (initial_lr of the param groups; Hugging Face's warm-up schedules are LambdaLRs); NaN "
              "without a scheduler: lr_max against it tells a schedule that never reaches its peak",
              "configured learning rate", "lr set", "log", "never"),
    Statistic("input_mean", "mean of the model's first floating input (pixels, features, embeddings; token ids "
              "are integers and skipped) over the batch",
              "input mean", "in mean", "linear", "never"),
    Statistic("input_std", "standard deviation of the model's first floating input over the batch",
              "input std", "in std", "log", "never"),
    Statistic("input_min", "smallest value of the model's first floating input in the batch",
              "input min", "in min", "linear", "never"),
    Statistic("input_max", "largest value of the model's first floating input in the batch",
              "input max", "in max", "linear", "never"),
    Statistic("padding_labelled_frac", "share of the labelled positions (labels not -100) whose attention mask is "
              "0, for a model called with token labels and an attention mask of their shape: padding counted in "
              "the loss; NaN for other calls",
              "labelled padding", "pad labels", "fraction", "never"),
    Statistic("logz_mean", "mean over the output's rows of log Z = logsumexp of the logits over the class "
              "(vocabulary) dimension, at the logging step's training forward (the output softmax_output reads; "
              "at most 4,096 rows, evenly spread, for a language model's logits): cross-entropy leaves it free, "
              "so it drifts where nothing (z-loss, weight decay) holds it",
              "output log Z (mean over rows)", "log Z", "linear", "never"),
    Statistic("logz_max", "the largest log Z among the same rows",
              "output log Z (largest row)", "log Z max", "linear", "never"),
    Statistic("grad_spike_step", "the step (any step, not only logging steps) since the previous logging step whose "
              "global gradient norm, taken before clipping, stood furthest above the last 128 steps' "
              "(tbdiag.measure.gradient_spikes; on a CPU the norms of every step are estimates compared with "
              "estimates, tbdiag.measure.sampled_norms); NaN until 16 steps of history",
              "largest gradient jump: step", "spike step", "linear", "never"),
    Statistic("grad_spike_z", "that step's robust z-score: (norm - median) / (1.4826 x MAD) of the last 128 global "
              "gradient norms",
              "largest gradient jump: z-score", "spike z", "linear", "never"),
    Statistic("grad_spike_ratio", "that step's global gradient norm over the median of the last 128",
              "largest gradient jump: x median", "spike ratio", "log", "never"),
    Statistic("grad_spike_loss_ratio", "the training loss at that step over the median of the last 128 steps' "
              "losses, where the model's output carries its loss (Hugging Face .loss); NaN otherwise",
              "loss at the gradient jump: x median", "spike loss", "log", "never"),
    Statistic("massive_act_ratio", "the largest max|h| / median|h| over the outputs of the model's repeated blocks "
              "(transformer layers; median from a fixed strided sample), at the logging step",
              "massive activation: max / median |h|", "massive", "log", "never"),
    Statistic("massive_act_max", "max|h| of that block's output", "massive activation: max |h|", "max |h|", "log",
              "never"),
    Statistic("massive_act_block", "position of that block among the repeated blocks (layer table extra 'blocks')",
              "massive activation: block", "block", "linear", "never"),
)
# fmt: on

BY_NAME: dict[str, Statistic] = {s.name: s for s in STATISTICS}
MODEL_BY_NAME: dict[str, Statistic] = {s.name: s for s in MODEL_STATISTICS}

#: The layer table's key columns, in the order it shows them.
KEY_STATS: tuple[str, ...] = tuple(
    s.name for s in sorted((s for s in STATISTICS if s.key_column is not None), key=lambda s: s.key_column)
)

#: What the heatmap shows when no finding suggests a statistic: every layer
#: with parameters has a gradient, and its norm shows learning step by step.
DEFAULT_HEATMAP = "grad_norm"


def _default_scale(name: str) -> str:
    return "fraction" if name.endswith("_frac") else "linear"


def statistic(name: str) -> Statistic:
    """The row for ``name``; a statistic this version does not know (written by
    a newer tbdiag) gets a plain row guessed from its name, so it can still be shown."""
    known = BY_NAME.get(name)
    if known is not None:
        return known
    return Statistic(name, meaning="", label=name, short=name, scale=_default_scale(name), chart="always")


def scale_of(name: str) -> str:
    """A statistic's scale (``log``, ``fraction`` or ``linear``)."""
    return statistic(name).scale


#: Activation kinds (`LayerInfo.activation`) judged by saturation; every other kind is rectifier-like.
SATURATING_KINDS: tuple[str, ...] = ("sigmoid", "tanh")


def activation_family(kind: str) -> str:
    """``"rectifier"``, ``"saturating"`` or ``""`` (nothing consumes the output) for an activation kind."""
    if not kind:
        return ""
    return "saturating" if kind in SATURATING_KINDS else "rectifier"


def applies_to(stat: Statistic, activation: str) -> bool:
    """Whether ``stat`` is measured on a layer whose output ``activation`` (a kind, or "") consumes."""
    return not stat.consumed_by or stat.consumed_by == activation_family(activation)


def statistics_json() -> list[dict[str, Any]]:
    """The table as JSON-ready dicts, in column order (what the tab reads from ``/rules``)."""
    return [s.to_json() for s in STATISTICS]


__all__ = [
    "Statistic", "STATISTICS", "BY_NAME", "MODEL_STATISTICS", "MODEL_BY_NAME", "KEY_STATS", "DEFAULT_HEATMAP",
    "SCALES", "CHARTS", "statistic",
    "scale_of", "statistics_json", "SATURATING_KINDS", "activation_family", "applies_to",
]
