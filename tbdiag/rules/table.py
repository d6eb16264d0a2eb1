"""Health rules: stored statistics in, findings out.

One table (`RULES`) says for each rule what it measures and which statistics
(`tbdiag.contract.statistics`) it reads, its default threshold, how many consecutive
logging steps must agree before it fires (one bad logging step is noise;
NaN/Inf and blow-ups are not), where the threshold comes from, what to try,
the word its flag shows and the threshold lines a chart draws.  Every reader
— `tbdiag report`, the TensorBoard tab — evaluates the same table with
`tbdiag.rules.evaluator.evaluate`, so a threshold changed after training changes every
view alike.  This module is the table; `tbdiag.rules.evaluator` says how each rule is
checked against a run.
"""

from __future__ import annotations

import math

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Mapping

from ..contract.rundata import json_number

SEVERITIES = ("info", "warning", "error")
SEVERITY_RANK = {name: i for i, name in enumerate(SEVERITIES)}


#: Which side of a threshold line a rule fires on.
DIRECTIONS = ("above", "below")


@dataclass(frozen=True)
class ThresholdLine:
    """A rule's limit as a line on one statistic's chart.

    Declared with the rule, so the chart draws exactly the limits the rule
    applies, with the user's overrides, and a new rule brings its own lines.
    """

    statistic: str  # the chart it belongs on
    direction: str  # "above" or "below": the side on which the rule fires
    label: str  # "{value}" (format spec allowed) stands for the limit's setting
    setting: str = ""  # "" for the rule's threshold, else one of its params
    relative_to_largest: bool = False  # the limit is setting x the largest layer's value at each step

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Rule:
    """One row of the rule table."""

    name: str
    statistic: str  # what is measured, in words
    threshold: float  # default; override with checks.evaluate(run, thresholds={name: x})
    persistence: int  # consecutive logging steps (or loss samples) that must agree
    severity: str
    source: str  # where the threshold comes from
    why: str
    advice: str  # what to try
    params: Mapping[str, float] = field(default_factory=dict)  # secondary thresholds, "name.param" to override
    word: str = ""  # the short flag a layer shows (the tooltip carries the rest)
    reads: tuple[str, ...] = ()  # the statistics it reads (`tbdiag.contract.statistics`), the one that shows it best first
    lines: tuple[ThresholdLine, ...] = ()  # its limits, drawn on the charts of the statistics they apply to

    def setting(self, name: str) -> float:
        """The value of a setting a threshold line names ("" is the main threshold)."""
        return self.threshold if not name else self.params[name]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["params"] = dict(self.params)
        out["reads"] = list(self.reads)
        out["lines"] = [line.to_json() for line in self.lines]
        return out


# fmt: off
RULES: tuple[Rule, ...] = (
    Rule(
        name="dead_relu",
        statistic="dead_frac: fraction of a layer's units (conv channels, linear features) whose rectifier-like "
                  "activation (ReLU, ReLU6, LeakyReLU(0), clamp(min=0), GELU, SiLU, ...) gives output and "
                  "derivative ~0 for every sample of the batch",
        threshold=0.5, persistence=3, severity="warning",
        source="SageMaker Debugger DeadRelu rule (flags a layer when over 50% of its ReLUs are inactive); "
               "AUTOTRAINER's dying-ReLU check. Smooth rectifiers (GELU, SiLU) count a unit dead below the "
               "pre-activation where both the output and its derivative stay under 1e-2 (tbdiag.measure.layers."
               "DEAD_BELOW: GELU -3.1, SiLU -6.5)",
        why="A unit that never fires passes no gradient, so it cannot learn its way back: the layer has lost "
            "that capacity for good.",
        advice="Lower the learning rate; use He/Kaiming initialisation and zero or small positive biases; "
               "try LeakyReLU/GELU; add BatchNorm before the activation.",
        word="dead", reads=("dead_frac", "dead_persist_frac"),
        lines=(ThresholdLine("dead_frac", "above", "dead_relu"),),
    ),
    Rule(
        name="vanishing_gradient",
        statistic="grad_rms: a layer's gradient RMS, against the largest layer's at the same step (ratio) and "
                  "in absolute terms",
        threshold=1e-4, persistence=3, severity="warning",
        params={"absolute": 1e-7, "update": 1e-5},
        source="SageMaker Debugger VanishingGradient rule (absolute threshold 1e-7); Glorot & Bengio (2010) and "
               "AUTOTRAINER compare gradients across layers: a 1e-4 ratio means the layer learns 10,000x slower. "
               "Under an adaptive optimizer (Adam, AdamW, RMSprop, Adagrad, Adafactor, ...) a small gradient "
               "still moves the weights, so the layer is flagged only when its update/weight ratio is also below "
               "'update' (1e-5, DeepDiagnosis's lower bound)",
        why="Layers far from the loss get gradients too small to move their weights; the network trains as if "
            "they were frozen at their initial values.",
        advice="Replace sigmoid/tanh hidden activations with ReLU-family ones; use Kaiming/Xavier initialisation; "
               "add residual connections or normalisation layers.",
        word="vanishing", reads=("grad_rms", "update_ratio"),
        lines=(ThresholdLine("grad_rms", "below", "vanishing_gradient (absolute)", setting="absolute"),
               ThresholdLine("grad_rms", "below", "vanishing: {value:g} x largest layer's",
                             relative_to_largest=True)),
    ),
    Rule(
        name="exploding_gradient",
        statistic="grad_rms: a layer's gradient RMS (per element)",
        threshold=10.0, persistence=2, severity="error",
        params={"at_once": 100.0},
        source="cs231n 'Neural Networks Part 3': healthy updates are ~1e-3 of the weights, so a per-element "
               "gradient above 10 overshoots any usual weight scale at any usual learning rate; "
               "DeepDiagnosis/AUTOTRAINER flag gradients growing past a fixed bound",
        why="Huge gradients throw the weights far away in one step; the loss jumps and soon turns NaN. It fires "
            "when two logged steps in a row agree, or at once beyond `at_once` x the threshold: a single large "
            "step that the next one does not confirm (a stock initialisation settling) is not an explosion, and "
            "a NaN that follows is named at its exact step by the nonfinite rule.",
        advice="Lower the learning rate; check the initialisation scale; clip gradients "
               "(torch.nn.utils.clip_grad_norm_); normalise inputs and regression targets.",
        word="exploding", reads=("grad_rms",),
        lines=(ThresholdLine("grad_rms", "above", "exploding_gradient"),),
    ),
    Rule(
        name="activation_growth",
        statistic="the RMS of a layer's output (from act_mean and act_std) against its early level: its own at "
                  "the first logged step, or the median layer's when that is larger",
        threshold=100.0, persistence=3, severity="warning",
        source="Rybakov et al. (2024), 'Methods of improving LLM training stability': the output norms of linear "
               "layers grow before a transformer diverges; Wortsman et al. (2023), 'Small-scale proxies for "
               "large-scale Transformer training instabilities'. 100x is tbdiag's choice: healthy recipes grow "
               "up to ~50x (ConvNeXt's projections behind a LayerScale at 1e-6), GPT-2 at lr 0.1 without warm-up "
               "100-1800x within its first logging intervals. A layer that starts below the median layer (a projection behind a uniform "
               "attention at init, a zero-initialised branch) is compared with the median: growing to the model's "
               "scale is learning",
        why="Activations that grow many times over feed ever larger logits and gradients; with a learning rate "
            "too high this shows in the first logging intervals, long before the loss turns NaN.",
        advice="Lower the (peak) learning rate and add warm-up; clip gradients; check normalisation layers sit "
               "where the architecture expects them (pre-LN); consider QK-layernorm or z-loss for large models.",
        word="growing", reads=("act_std", "act_mean"),
    ),
    Rule(
        name="saturated_activation",
        statistic="saturated_frac: fraction of sigmoid/tanh outputs within 1% of their bounds",
        threshold=0.5, persistence=3, severity="warning",
        source="SageMaker Debugger SaturatedActivation rule (flags a layer when over 50% of tanh/sigmoid units "
               "saturate); Glorot & Bengio (2010) on saturated sigmoid layers",
        why="A saturated unit has a near-zero derivative: it stops passing gradient, like a dead ReLU.",
        advice="Scale down the initialisation (Xavier); normalise the inputs; add LayerNorm/BatchNorm before the "
               "activation; lower the learning rate.",
        word="saturated", reads=("saturated_frac",),
        lines=(ThresholdLine("saturated_frac", "above", "saturated_activation"),),
    ),
    Rule(
        name="nonfinite",
        statistic="the step and layer where NaN/Inf is born (nonfinite_step, nonfinite_layer, nonfinite_where: "
                  "the model output checked at every step), and act_nonfinite, grad_nonfinite, weight_nonfinite: "
                  "counts of NaN/Inf at the logged steps",
        threshold=0.0, persistence=1, severity="error",
        source="SageMaker Debugger ExplodingTensor rule: any NaN/Inf is fatal",
        why="One NaN spreads through every later update; the run is lost from this step on.",
        advice="Check the inputs of the named layer at that step for NaN/Inf; use torch.autograd.detect_anomaly "
               "around that step; lower the learning rate; guard log/sqrt/division against zero.",
        word="NaN/Inf", reads=("grad_nonfinite", "act_nonfinite", "weight_nonfinite"),
        lines=tuple(ThresholdLine(stat, "above", "nonfinite")
                    for stat in ("act_nonfinite", "grad_nonfinite", "weight_nonfinite")),
    ),
    Rule(
        name="frozen_layer",
        statistic="changed: whether a layer's parameters changed between logging steps while they received "
                  "non-zero gradients",
        threshold=0.0, persistence=3, severity="warning",
        source="cs231n update/weight ratio (~1e-3 is healthy, exactly 0 means no update at all)",
        why="The layer gets gradients but its weights never move: it is missing from the optimizer's parameter "
            "groups (or its learning rate is 0). Layers frozen with requires_grad=False get no gradients and are "
            "not flagged.",
        advice="Pass all parameters to the optimizer (build it after the model is complete, or add a param group); "
               "if the freeze is intended, set requires_grad=False.",
        word="frozen", reads=("changed", "grad_params", "grad_norm"),
        lines=(ThresholdLine("changed", "below", "frozen_layer"),),
    ),
    Rule(
        name="no_gradient",
        statistic="grad_params: how many of a layer's parameter tensors received a gradient, and grad_norm: "
                  "whether those gradients are exactly zero, for layers with trainable parameters that are all in "
                  "the watched optimizer (act_mean: whether it ran in the forward)",
        threshold=0.0, persistence=3, severity="warning",
        source="PyTorch 'Autograd mechanics: locally disabling gradient computation' (results computed under "
               "torch.no_grad() or .detach() carry no gradient back); DistributedDataParallel refuses parameters "
               "that receive no gradient unless find_unused_parameters=True",
        why="The optimizer holds the layer and it is meant to train, but no gradient reaches it: something in "
            "the forward cut it off the graph, or everything after it passes back exact zeros (a dead block, a "
            "fully masked attention), so its weights move by weight decay alone. A layer that never runs in the "
            "training forward is reported as info: an unused module.",
        advice="Look for torch.no_grad(), .detach(), .data, .item() or a numpy round trip between this layer and "
               "the loss; if the layer is meant to stay fixed, set requires_grad=False (or leave it out of the "
               "optimizer); delete modules the forward never uses.",
        word="no grad", reads=("grad_params", "grad_norm", "act_mean"),
        lines=(ThresholdLine("grad_params", "below", "no_gradient"),),
    ),
    Rule(
        name="eval_mode_training",
        statistic="eval_mode_steps: optimizer steps taken while the model was in eval() mode and ran no "
                  "training forward, counted between logging steps (needs optimizer=)",
        threshold=0.0, persistence=1, severity="warning",
        source="PyTorch nn.Module.eval() / train() docs (eval() switches Dropout and BatchNorm to inference "
               "behaviour); PyTorch 'Autograd mechanics: evaluation mode' (eval() is not no_grad, so training "
               "silently continues); the common forgotten model.train() after a validation loop",
        why="After validation the loop goes on training in eval mode: dropout is off and BatchNorm normalises "
            "with frozen running statistics, so the model trains differently from what was intended (and tbdiag, "
            "which measures training forwards only, records nothing).",
        advice="Call model.train() at the start of every training epoch or step (after each validation loop); "
               "to freeze BatchNorm or dropout on purpose, put only those submodules in eval() so the model "
               "itself stays in train mode.",
        word="eval mode",
    ),
    Rule(
        name="stale_gradients",
        statistic="stale_gradients: 1 when the gradient an optimizer step used was still in .grad when the next "
                  "backward began (checked on one small parameter at each logging step, needs optimizer=)",
        threshold=0.5, persistence=2, severity="error",
        source="PyTorch recipe 'Zeroing out gradients in PyTorch' (backward() accumulates into .grad); "
               "pytorch/pytorch#47175 asks PyTorch to warn when zero_grad() is not called before step()",
        why="backward() adds to .grad: without zero_grad() every step uses the sum of all gradients so far, an "
            "ever larger and staler step, and training drifts or diverges. Gradient accumulation over "
            "micro-batches clears after the optimizer step and is not flagged.",
        advice="Call optimizer.zero_grad() (or model.zero_grad()) once per optimizer step: before the backward "
               "passes of the step, or right after optimizer.step().",
        word="stale grads",
    ),
    Rule(
        name="softmax_output",
        statistic="softmax_output: 1 when the model's output (logits of a Hugging Face output, else its first "
                  "tensor) is non-negative with rows summing to 1 over its class dimension",
        threshold=0.5, persistence=3, severity="warning",
        source="PyTorch CrossEntropyLoss docs: 'The input is expected to contain the unnormalized logits for each "
               "class'; NLLLoss docs: log-probabilities come from a LogSoftmax layer",
        why="CrossEntropyLoss applies log_softmax itself: a softmax before it squashes the logits into [0, 1], "
            "the gradients shrink and the loss creeps towards a floor well above zero.",
        advice="Return raw logits from forward() and keep CrossEntropyLoss; or return log_softmax and use "
               "NLLLoss; apply softmax only to read probabilities at inference. If the loss takes the log itself, "
               "use log_softmax instead (more stable).",
        word="softmax",
    ),
    Rule(
        name="loss_divergence",
        statistic="a training loss scalar: NaN/Inf, or even its lows (the smallest of every 5 values) above "
                  "(1 + threshold) x its starting value (median of its first 5)",
        threshold=0.5, persistence=3, severity="error",
        source="SageMaker Debugger ExplodingTensor/LossNotDecreasing practice: a loss above where it started is "
               "diverging, not learning",
        why="The optimiser is climbing instead of descending: steps are too large for the loss surface. A loss "
            "that swings up and down around a level is loss_oscillation, not this.",
        advice="Lower the learning rate or add warm-up; clip gradients; check the loss for a sign error.",
        word="diverging",
    ),
    Rule(
        name="loss_plateau",
        statistic="a training loss scalar: the fall from its first tenth to its last quarter (medians), against "
                  "z x its noise (the median's standard error, from the spread of batch-to-batch differences) "
                  "and threshold x its start; or, when the output width tells the classes C, a last half that "
                  "stays within chance_band of ln C without falling",
        threshold=0.005, persistence=20, severity="warning",
        params={"z": 3.0, "chance_band": 0.05},
        source="SageMaker Debugger LossNotDecreasing rule (minimum relative decrease over a window of steps), with "
               "a significance test against the curve's own noise (3 standard errors); a C-way cross-entropy of "
               "ln C is uniform guessing (Karpathy, 'A Recipe for Training Neural Networks': check the loss at "
               "chance level)",
        why="A loss that never falls beyond its batch-to-batch noise learns nothing, however much single batches "
            "wobble; one that sits at ln C predicts no better than a coin with C sides.",
        advice="Check that the learning rate is not ~0 (1000x too small looks flat) and that the optimizer holds "
               "the model's parameters; check that labels still match their inputs (a shuffle applied to one but "
               "not the other leaves the loss at ln C); look for dead or frozen layers above; overfit one batch "
               "to test the pipeline.",
        word="plateau",
    ),
    Rule(
        name="loss_spike",
        statistic="a training loss scalar (rolling median of 5) against its running best: a jump above z noise "
                  "units, above threshold x what was learned so far (start - best), above relative x the best and "
                  "above history x the largest departure the curve made before, for persistence values",
        threshold=0.25, persistence=3, severity="warning",
        params={"z": 6.0, "relative": 0.5, "history": 2.0},
        source="Loss-spike practice of large-model training (PaLM, Chowdhery et al. 2022; OPT logbook): a jump "
               "far above the running best that does not fall back within a few batches; 6 noise units and a "
               "quarter of the progress are tbdiag's choice, beyond any batch-to-batch wobble. `history`: a "
               "spike departs from the run's own history of bounces (noisy labels, SGD with momentum bounce by "
               "design); twice the largest earlier departure is tbdiag's choice",
        why="Training that loses much of what it had learned in a few steps was knocked off course: a bad batch, "
            "an instability, or a part of the model that broke (a layer dying mid-run).",
        advice="Look at the layers flagged at that step (dead, NaN, exploding); skip or inspect the batches at the "
               "jump; lower the learning rate or clip gradients; restart from the last checkpoint before it.",
        word="spike",
    ),
    Rule(
        name="loss_oscillation",
        statistic="a training loss scalar (rolling median of 5): moves up and down between turns, each at least "
                  "threshold x the loss level (and progress x what was learned), with lows that do not climb",
        threshold=1.0, persistence=4, severity="warning",
        params={"progress": 0.5},
        source="Goodfellow, Bengio & Courville, 'Deep Learning' sec. 8.3 and cs231n 'Neural Networks Part 3': a "
               "learning rate too high (or cycling too high) makes the loss bounce instead of descend; swings as "
               "large as the level itself, 4 up and 4 down, are tbdiag's choice: batch noise around a flat loss with 10% "
               "label noise makes 3 by chance (a healthy ResNet with SGD and momentum), a loss that unlearns "
               "what alternating batches taught makes 5",
        why="A loss that keeps doubling and halving does not converge: each step overshoots the valley the last "
            "one aimed for. It is not divergence: its lows do not climb.",
        advice="Lower the (peak) learning rate; for a cyclic schedule lower max_lr; add momentum damping or "
               "gradient clipping; shuffle the data if batches alternate between different kinds of samples.",
        word="oscillating",
    ),
    Rule(
        name="overfitting",
        statistic="a validation loss scalar (a 'val', 'valid', 'validation', 'eval' or 'test' tag, or one "
                  "listed as val_tags in the layer table): its last persistence values above its best by "
                  "threshold x best and z noise units, while the paired training loss falls over the same steps",
        threshold=0.05, persistence=3, severity="warning",
        params={"z": 3.0},
        source="Early stopping (Prechelt, 'Early Stopping - But When?', 1998): validation error rising while "
               "training error falls is the mark of overfitting; 5% over 3 evaluations is tbdiag's choice",
        why="The model is memorising the training set: it keeps getting better on it and worse on data it has "
            "not seen. Lowering the learning rate does not help.",
        advice="Stop early (keep the checkpoint at the best validation loss); add regularisation (weight decay, "
               "dropout, data augmentation); get more data or use a smaller model.",
        word="overfitting",
    ),
    Rule(
        name="update_too_large",
        statistic="update_ratio: ||w_after - w_before|| / ||w_after|| of a layer over one optimizer step",
        threshold=0.1, persistence=3, severity="warning",
        params={"zero_init": 1e-4},
        source="cs231n 'Neural Networks Part 3' (a healthy update/weight ratio is about 1e-3); DeepDiagnosis "
               "(Wardat et al., ICSE 2022) and TheDeepChecker (Ben Braiek & Khomh, 2022) use 1e-1 as the upper "
               "bound of a healthy update. `zero_init`: a layer whose weights start with an RMS below it "
               "(LayerScale at 1e-6, ReZero and adaLN-Zero gains, position-bias tables at 0) grows from nothing "
               "by design, so its ratio is not judged until it reaches half its latest size",
        why="A step that moves a layer's weights by a tenth of their size throws away what it learned each step; "
            "the loss bounces or blows up, and ReLUs die.",
        advice="Lower the learning rate (of this layer's param group); add warm-up; clip gradients; check the "
               "layer's initialisation is not near zero.",
        word="big steps", reads=("update_ratio", "weight_norm"),
        lines=(ThresholdLine("update_ratio", "above", "update_too_large"),),
    ),
    Rule(
        name="update_too_small",
        statistic="update_ratio: ||w_after - w_before|| / ||w_after|| of a layer over one optimizer step "
                  "(non-zero; a warm-up stretch at the start and a schedule decayed below `lr_floor` of its peak "
                  "do not count; normalisation layers are held to `norm_scale` x the threshold)",
        threshold=1e-5, persistence=3, severity="warning",
        params={"lr_floor": 0.1, "norm_scale": 0.02},
        source="cs231n 'Neural Networks Part 3' (a healthy update/weight ratio is about 1e-3); DeepDiagnosis "
               "(Wardat et al., ICSE 2022) uses 1e-5 as the lower bound of a healthy update (TheDeepChecker 1e-4). "
               "`lr_floor`: the tail of a cosine or step schedule is the warm-up's mirror, a planned slow-down. "
               "`norm_scale`: under Adam every element moves by about the learning rate whatever its size, so a "
               "norm gain near 1.0 reads 30-50x lower than a weight matrix at std 0.02 on a healthy run",
        why="Weights that move by less than 1e-5 of their size per step need some 100,000 steps to change at all: "
            "the layer is as good as frozen.",
        advice="Raise the learning rate (of this layer's param group: a group left at ~0, or a scheduler that "
               "decayed it to nothing); check the gradient reaching the layer (vanishing?).",
        word="tiny steps", reads=("update_ratio",),
        lines=(ThresholdLine("update_ratio", "below", "update_too_small"),),
    ),
    Rule(
        name="prediction_collapse",
        statistic="an add_evaluation confusion matrix: share of all predictions given to the most-predicted "
                  "class, and the recall over the samples of every other class",
        threshold=0.9, persistence=2, severity="error",
        params={"other_recall": 0.5},
        source="Buda, Maki & Mazurowski (2018), 'A systematic study of the class imbalance problem in "
               "convolutional neural networks' (CNNs fall back to predicting one class); He & Garcia (2009), "
               "'Learning from Imbalanced Data' (the accuracy paradox). 90% and 50% are tbdiag's choice: beyond "
               "what a classifier that still tells the classes apart produces",
        why="A model that answers one class whatever the input has learned the class frequencies, not the task; "
            "its accuracy can still look fine when that class is common.",
        advice="Lower the learning rate (a collapse often follows a blow-up); check that the labels match the "
               "inputs and are not all one value; rebalance the classes (class weights, a balanced sampler); look "
               "for dead or saturated last layers above.",
        word="collapse",
    ),
    Rule(
        name="neglected_class",
        statistic="an add_evaluation confusion matrix: a class's recall against the median recall of the other "
                  "classes (classes with at least min_support samples)",
        threshold=0.25, persistence=2, severity="warning",
        params={"min_support": 10},
        source="Sokolova & Lapalme (2009), 'A systematic analysis of performance measures for classification "
               "tasks' (per-class recall shows what overall accuracy hides); Buda et al. (2018) on minority "
               "classes; the 0.25 ratio is tbdiag's choice: far below the others, not merely the hardest class",
        why="Overall accuracy can be high while one class is almost never recognised (or never predicted): the "
            "model has given up on it, usually because it is rare or looks like another class.",
        advice="Look at what the class is taken for (its row of the confusion matrix); add or oversample its "
               "examples, weight it in the loss, or check its labels; if it truly looks like another class, "
               "give the model inputs that tell them apart.",
        word="neglected",
    ),
    Rule(
        name="input_bound",
        statistic="perf/input_wait_frac: share of wall-clock step time spent waiting for input (from one step's "
                  "end to the next training forward, or inside a watch_loader loader's __next__), over the steps "
                  "since the previous logging step; info above the threshold, warning above the 'warning' setting; "
                  "never for a wait under min_wait_ms per step (a tiny step's own loop code)",
        threshold=0.15, persistence=3, severity="warning",
        params={"warning": 0.3, "min_wait_ms": 1.0},
        source="PyTorch's TensorBoard profiler plugin (torch-tb-profiler) advised more DataLoader workers once "
               "the DataLoader took over 5% of a step; TraceML rates ~50% input wait 'input-bound / critical'. "
               "tbdiag's wait also holds the loop's own code (logging, slicing), a few percent of a small step, "
               "so info starts at 15%; 30% for the warning is tbdiag's choice: a third of the run spent waiting",
        why="While the loop waits for the next batch the model does not compute: the run takes longer than its "
            "compute needs, and a faster device or model would not make it quicker.",
        advice="DataLoader(num_workers=N) with N up to the CPU cores; pin_memory=True and .to(device, "
               "non_blocking=True) with a GPU; persistent_workers=True so workers survive epochs; prefetch_factor "
               "2-4; move transforms and augmentation to the GPU (on batched tensors); cache decoded data "
               "(decode images or tokenise once, store tensors); keep slow per-step code out of the loop.",
        word="input-bound",
    ),
    Rule(
        name="padding_in_loss",
        statistic="padding_labelled_frac: of the label positions the loss counts (label not -100), the share whose "
                  "attention mask is 0, for a model called with labels and an attention mask of their shape "
                  "(Hugging Face; the decoder's mask for encoder-decoder models), measured on logging steps",
        threshold=0.02, persistence=2, severity="warning",
        source="Hugging Face Transformers: labels set to -100 are ignored by the loss, and "
               "DataCollatorForLanguageModeling sets padded labels to -100 while DataCollatorWithPadding does not "
               "touch them; PyTorch CrossEntropyLoss(ignore_index=-100). 2% is tbdiag's choice: any share is a "
               "mistake, a few percent changes the logged loss",
        why="Padded positions labelled with the pad token are counted in the loss: the model is trained to predict "
            "padding after padding, which is trivial, so the logged loss falls fast and reads far lower than the "
            "loss on the text; in short batches with long padding it mostly measures padding.",
        advice="Set the labels of padded positions to -100: DataCollatorForLanguageModeling(tokenizer, mlm=False) "
               "does it (or labels = input_ids.masked_fill(attention_mask == 0, -100)); DataCollatorForSeq2Seq "
               "(label_pad_token_id=-100) for encoder-decoder models.",
        word="pad in loss",
    ),
    Rule(
        name="lr_schedule",
        statistic="lr_max: the learning rate at each logging step (largest param group), against lr_initial, the "
                  "rate the optimizer was configured with (a torch LR scheduler's initial_lr): exactly 0 for "
                  "persistence logged steps and zero_share of the run, or a highest rate so far below threshold x "
                  "the configured one while the rate stands still between logged steps",
        threshold=0.1, persistence=3, severity="warning",
        params={"zero_share": 0.05},
        source="PyTorch 'How to adjust learning rate' (scheduler.step() after optimizer.step(); most schedulers "
               "step per iteration, an epoch-level call stretches them by the steps per epoch); Hugging Face "
               "get_linear_schedule_with_warmup (0 at step 0 and after num_training_steps). 10% of the configured "
               "rate and 5% of the run at 0 are tbdiag's choice: a warm-up passes both within its first steps, a "
               "cosine ends at 0 on its last step only",
        why="The optimizer is configured with one learning rate but trains with another: a rate at 0 moves no "
            "weight, a rate stuck at a few percent of its peak learns as slowly as a rate set far too low. The "
            "layers then show tiny updates and the loss a plateau, which are the schedule's doing.",
        advice="Call scheduler.step() once per optimizer step (not per epoch) for warm-up schedules; give "
               "num_warmup_steps and num_training_steps in optimizer steps (epochs x batches per epoch / gradient "
               "accumulation); check that a LambdaLR's function does not return 0 beyond the first step.",
        word="lr schedule",
    ),
    Rule(
        name="input_scale",
        statistic="the root mean square of the model's first floating input (sqrt(input_mean^2 + input_std^2); "
                  "token ids are integers and skipped), from step 0; not for a model whose first layer "
                  "normalises (BatchNorm, LayerNorm)",
        threshold=10.0, persistence=2, severity="warning",
        source="LeCun, Bottou, Orr & Mueller, 'Efficient BackProp' (1998): inputs should be centred and scaled to "
               "unit variance; He et al. (2015) and Glorot & Bengio (2010) initialisations assume unit-scale "
               "inputs; torch-audit names 0-255 inputs at step 0. 10x the unit scale is tbdiag's choice: "
               "normalised images (within about +-3), pixels in 0-1, embeddings and audio waveforms stay far "
               "below it, 0-255 pixels (RMS ~100) far above",
        why="Layers initialised for unit-scale inputs receive values a hundred times larger: their outputs and "
            "gradients are as many times too large, ReLUs die and sigmoids saturate within the first steps, and "
            "the layer rules then name only those consequences.",
        advice="Normalise the inputs: divide pixels by 255 and subtract the mean / divide by the std per channel "
               "(torchvision transforms.Normalize, or the model's image processor); standardise tabular and "
               "regression features (zero mean, unit variance, from the training set's statistics).",
        word="input scale",
    ),
    Rule(
        name="epsilon_dominated",
        statistic="eps_dominated_frac: under an Adam-family optimizer, the share of a layer's coordinates that "
                  "received a gradient whose sqrt(v_hat) (bias-corrected exp_avg_sq; max_exp_avg_sq with amsgrad) "
                  "is below the optimizer's eps, read from optimizer.state after the step (SGD, Adafactor, Adagrad "
                  "and other optimizers: not measured); a stretch from the first logged step that ends before the "
                  "last is a start-up transient (LayerScale, zero-initialised branches) and does not count",
        threshold=0.5, persistence=3, severity="warning",
        source="Wortsman et al. 2023, 'Small-scale proxies for large-scale Transformer training instabilities' "
               "(once the gradient RMS falls to eps the AdamW update collapses; eps 1e-15 fixes it); OLMo 2 lowered "
               "eps from 1e-5 to 1e-8 for the same reason; Molybog et al. 2023, 'A Theory on Adam Instability' "
               "(gradients of the size of eps make Adam's update behave like SGD's); half of the coordinates is "
               "tbdiag's choice: the layer, not a few stray coordinates (a key bias, whose gradient is ~0 by "
               "construction), has stopped following its gradient",
        why="Adam divides by sqrt(v_hat) + eps: while sqrt(v_hat) is far above eps the update follows the gradient "
            "whatever its scale, but once the gradient falls to eps (tiny losses, loss scaled down, bf16-sized "
            "gradients against a large eps, very large models) the update shrinks with the gradient and the layer "
            "stalls, though nothing looks wrong with the learning rate.",
        advice="Lower Adam's eps (1e-8 to 1e-15, or torch.optim's default 1e-8 if it was raised to 1e-6 or 1e-5); "
               "check that the loss is not scaled down (a mean over far too many elements, a loss weight of "
               "1e-6); keep the loss in float32 and unscale fp16 gradients before the step (GradScaler.unscale_).",
        word="eps-dominated", reads=("eps_dominated_frac",),
        lines=(ThresholdLine("eps_dominated_frac", "above", "epsilon_dominated"),),
    ),
    Rule(
        name="logit_divergence",
        statistic="logz_mean, logz_max: log Z = logsumexp of the model's output logits over the class "
                  "(vocabulary) dimension, mean and largest over the rows of the logging step's training forward "
                  "(a language model's: a sample of at most 4,096 rows); fires when the mean lies more than "
                  "threshold nats from its value at the first logged step, or the largest row more than `max` "
                  "nats from its own (banner only: a model-level finding)",
        threshold=30.0, persistence=2, severity="warning",
        params={"max": 60.0},
        source="Wortsman et al. 2023, 'Small-scale proxies for large-scale Transformer training instabilities' "
               "(output logit divergence at high learning rates; z-loss removes it); PaLM (Chowdhery et al. 2022) "
               "adds z-loss 1e-4 * log^2 Z; OLMo-core's z_loss_multiplier 1e-5. Thresholds calibrated on tbdiag's "
               "healthy recipes (GPT-2, Llama, Mixtral, BERT MLM, ViT, Swin, ConvNeXt: log Z moves by at most 9 "
               "nats over 720 steps, its largest row by 11) and a GPT-2 without its final LayerNorm at lr 0.1 "
               "(the mean jumps by 56 nats, the largest row by 128, as the loss diverges); 30 nats from a start "
               "near ln C puts log Z past 32, where bfloat16 logits are a quarter of a nat apart",
        why="Cross-entropy does not change when every logit shifts by the same amount, so nothing in the loss "
            "holds log Z: at a high learning rate the logits run away, the softmax saturates, low-precision "
            "logits lose the differences between classes, and the loss spikes or diverges.",
        advice="Add z-loss (PaLM: 1e-4 * logsumexp(logits)^2, averaged over tokens; OLMo-core z_loss_multiplier "
               "1e-5); lower the (peak) learning rate or lengthen the warm-up; keep weight decay on the output "
               "layer; qk-layernorm and a final normalisation before the output head; compute the loss in float32.",
        word="log Z drift",
    ),
    Rule(
        name="gradient_spike",
        statistic="the global gradient norm of every step (taken before clipping) against the last 128 steps': "
                  "the step since each logging step that stood furthest above them, with every layer's gradient "
                  "norm at that step; fires when its robust z-score (median, MAD) is at least the threshold and "
                  "its norm at least ratio x the median. The layers that carried it: those whose own gradient "
                  "norm there grew most over their logged median, most of the jump's squared norm. A jump is damage "
                  "when the training loss at that step (the model output's .loss, or a loss scalar logged at "
                  "that step) is at least 'loss' x its median of the 128 steps before and, where the loss curve "
                  "is logged, at least 'start' x the untrained model's (its first values); where the loss at that "
                  "step is unknown, when the norm is at least 'alone' x the median and the logged loss did not "
                  "fall across the step",
        threshold=6.0, persistence=1, severity="warning",
        params={"ratio": 2.0, "loss": 1.5, "start": 1.5, "alone": 10.0},
        source="OLMo-core's StabilityMonitorCallback (a spike is 6 standard deviations above the last 128 "
               "values); llm-foundry's loss-spike callback and ZClip (Kumar et al. 2025) judge a gradient norm "
               "against its moving mean (llm-foundry: 2x); SPAM (Huang et al. 2025) finds gradient spikes up to "
               "1000x typical, most often in LayerNorm parameters. Median and MAD instead of mean and standard "
               "deviation: the first steps' transient and the spike itself barely move them. A model escaping a plateau "
               "(BERT, Llama recipes) has its gradient norm jump 4-90x while its loss falls, and a classifier that "
               "has nearly memorised its data has it jump 50-130x on its few hard batches (their loss still far "
               "below an untrained model's): the loss at the step tells them from damage, a batch that scores "
               "worse than the untrained model (1.5x the recent median, 1.5x the start level and, where the loss "
               "is unknown, 10x alone are tbdiag's choices)",
        why="One bad batch or a numerical instability between logging steps throws the weights in one step "
            "(Adam's moments keep the shock for many more); the logging steps see only the aftermath. Knowing "
            "the exact step finds the batch, and the layers that carried it show where the model is fragile.",
        advice="Inspect the batch at that step (corrupt samples, wrong scale, shuffled labels); clip gradients "
               "(clip_grad_norm_ at ~1.0) or skip steps whose norm jumps (ZClip, SPAM); lower the learning rate "
               "or lengthen the warm-up; for spikes in normalisation layers, weight decay on their gains or QK "
               "normalisation.",
        word="grad spike", reads=("spike_grad_norm", "spike_grad_typical", "grad_norm"),
    ),
    Rule(
        name="massive_activations",
        statistic="massive_act_ratio: the largest max|h| / median|h| over the outputs of the model's repeated "
                  "blocks (transformer layers), at logging steps; info at the threshold, a warning when it grew "
                  "'growth' x from its first logged value while the training loss went up (its smoothed value at "
                  "the end above its best by 'damage' x what it had learned)",
        threshold=100.0, persistence=3, severity="info",
        params={"growth": 10.0, "damage": 0.5},
        source="Sun et al. (2024), 'Massive Activations in Large Language Models': a few hidden-state values "
               "above 100 and about 1,000-10,000x the median, in fixed dimensions of the residual stream after the "
               "early layers, in healthy trained LLMs too (they act as biases for attention sinks); Bondarenko et "
               "al. (2023) tie such outliers to attention heads that learn to 'do nothing', and to quantisation "
               "error",
        why="Massive activations are normal in trained language models, so alone they are information: they "
            "explain outliers that break int8 quantisation and attention sinks. When they keep growing while the "
            "loss gets worse, the residual stream is running away.",
        advice="Usually nothing; for quantisation keep those dimensions in higher precision. If they grow with "
               "the loss: lower the learning rate, add QK normalisation or an explicit attention bias (Sun et "
               "al.), weight decay on the norm gains.",
        word="massive",
    ),
    Rule(
        name="expert_collapse",
        statistic="a mixture-of-experts router's top-k choices over a logged batch: at least the threshold of the "
                  "tokens on its busiest expert (expert_top_share; top_k / num_experts when balanced), or at "
                  "least 'idle' of its experts with no token (experts_idle_frac)",
        threshold=0.9, persistence=3, severity="warning",
        params={"idle": 0.25},
        source="Shazeer et al. (2017) and Switch Transformer (Fedus et al. 2021): without a load-balancing loss "
               "the router favours the experts that are already favoured and the others stop learning; ST-MoE "
               "(Zoph et al. 2022) adds the router z-loss; OLMo-core logs the load imbalance (max / mean load). "
               "Nine tenths of the tokens on one expert, or a quarter of the experts idle for three logged "
               "batches in a row, is tbdiag's choice",
        why="A collapsed router sends the tokens to a few experts: the others get no gradient, the model has "
            "the cost of all its experts and the capacity of a few.",
        advice="Turn on the load-balancing auxiliary loss (Hugging Face: output_router_logits=True, "
               "router_aux_loss_coef ~0.01-0.02) and the router z-loss; add router jitter noise; lower the "
               "router's learning rate; check the router's initialisation (no large bias).",
        word="experts", reads=("expert_top_share", "experts_idle_frac"),
        lines=(ThresholdLine("expert_top_share", "above", "expert_collapse"),
               ThresholdLine("experts_idle_frac", "above", "expert_collapse idle", setting="idle")),
    ),
    Rule(
        name="attention_logit_growth",
        statistic="attn_logit_max: the largest attention logit (softmax input, q.k x the model's scale) of an "
                  "attention module's sampled query rows over every head (attn_logit_head: which head)",
        threshold=100.0, persistence=2, severity="warning",
        source="Dehghani et al. (2023), 'Scaling Vision Transformers to 22 Billion Parameters': uncontrolled growth "
               "of attention logits gives near one-hot attention and divergence; Wortsman et al. (2023), "
               "'Small-scale proxies for large-scale Transformer training instabilities': reproduced at small scale "
               "with a high learning rate, removed by qk-layernorm; Kimi K2's QK-Clip caps the max logit at "
               "tau = 100, and Megatron-LM logs the max attention logit. Healthy recipes stay under 15 (GPT-2, Llama, "
               "BERT, ViT, Swin, Mixtral, T5); GPT-2 at lr 0.1 without warm-up reaches 130-3000",
        why="A logit of 100 puts e^100 times more weight on one key than on a key at 0: the attention is one-hot, "
            "its softmax passes almost no gradient, and the logits keep growing until the loss spikes or diverges.",
        advice="Add qk-layernorm (a LayerNorm or RMSNorm on queries and keys per head); lower the learning rate or "
               "lengthen the warm-up; reparametrise the query/key weights (sigmaReparam) or clip the logits "
               "(QK-Clip: rescale W_q, W_k when the max logit passes tau).",
        word="attn logits", reads=("attn_logit_max", "attn_logit_head"),
        lines=(ThresholdLine("attn_logit_max", "above", "attention_logit_growth"),),
    ),
    Rule(
        name="attention_entropy_collapse",
        statistic="attn_entropy: an attention module's mean normalised attention entropy (entropy / ln(keys "
                  "attended), over heads and sampled query rows), below the threshold and below `relative` x its "
                  "early level (the highest of its first 3 logged values); attn_entropy_min names the lowest head",
        threshold=0.1, persistence=2, severity="warning",
        params={"relative": 0.25},
        source="Zhai et al. (2023), 'Stabilizing Transformer Training by Preventing Attention Entropy Collapse': "
               "attention entropy collapsing towards 0 goes with loss spikes and divergence, fixed by "
               "sigmaReparam. A layer's mean over heads, not a single head: positional heads are legitimately "
               "sharp. 0.1 is tbdiag's choice: healthy recipes keep every layer's mean above 0.35 (T5 0.36, GPT-2 "
               "over 720 steps 0.47, Llama 0.70, BERT 0.93); GPT-2 at lr 0.1 without warm-up falls to 0.05 within "
               "10 steps. `relative`: a layer whose attention is sharp from the start (a mask written as a finite "
               "bias, Swin's -100) has not collapsed",
        why="When every head of a layer attends to a single key, the layer stops mixing information and its "
            "softmax passes almost no gradient; training turns unstable (loss spikes, divergence).",
        advice="Add qk-layernorm; lower the learning rate or lengthen the warm-up; sigmaReparam (spectral "
               "reparametrisation of the query/key weights) or QK-Clip keep the logits, and so the entropy, in range.",
        word="attn collapse", reads=("attn_entropy", "attn_entropy_min", "attn_entropy_head"),
        lines=(ThresholdLine("attn_entropy", "below", "attention_entropy_collapse"),),
    ),
)
# fmt: on

RULES_BY_NAME: dict[str, Rule] = {rule.name: rule for rule in RULES}
ISSUES: tuple[str, ...] = tuple(RULES_BY_NAME)


def word_of(issue: str) -> str:
    """The flag word of a finding kind (the kind's own name when no rule declares one)."""
    rule = RULES_BY_NAME.get(issue)
    return rule.word if rule is not None and rule.word else issue


@dataclass
class Finding:
    """One diagnosis, the unit of `tbdiag report --format json` and the tab."""

    run: str
    layer: str | None
    issue: str
    severity: str
    first_step: int
    last_step: int
    value: float | None
    message: str
    threshold: float | None = None
    statistic: str | None = None
    advice: str = ""
    ongoing: bool = False  # still true at the last logged step
    explained_by: str | None = None  # another finding this one follows from
    # (first, last) logged steps of each stretch where it holds; empty: first_step..last_step.
    # A reader's view, not part of the report's JSON.
    spans: tuple[tuple[int, int], ...] = ()

    def holds_at(self, step: int) -> bool:
        """Whether the finding holds at a logged step (not merely started before it)."""
        spans = self.spans or ((self.first_step, self.last_step),)
        return any(a <= step <= b for a, b in spans)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        del out["spans"]
        out["value"] = json_number(self.value)
        out["threshold"] = json_number(self.threshold)
        return out


def resolve(thresholds: Mapping[str, float] | None = None) -> dict[str, Rule]:
    """The rule table with user overrides applied.

    Keys: ``"rule"`` (main threshold), ``"rule.persistence"``, ``"rule.<param>"``.
    Unknown keys raise ValueError naming the valid ones, so a typo never
    silently keeps the default.
    """
    rules = dict(RULES_BY_NAME)
    for key, value in (thresholds or {}).items():
        name, _, part = key.partition(".")
        if name not in rules:
            raise ValueError(f"unknown rule {name!r} in threshold {key!r}; rules are: {', '.join(RULES_BY_NAME)}")
        rule = rules[name]
        try:
            value = float(value)
        except (TypeError, ValueError, OverflowError):
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"threshold {key!r} must be a number, finite, e.g. {key}=0.5") from None
        if not part:
            rules[name] = replace(rule, threshold=value)
        elif part == "persistence":
            if value < 1 or value != int(value):
                raise ValueError(f"{key} must be a whole number >= 1, got {value!r}")
            rules[name] = replace(rule, persistence=int(value))
        elif part in rule.params:
            rules[name] = replace(rule, params={**rule.params, part: value})
        else:
            valid = ", ".join([name, f"{name}.persistence"] + [f"{name}.{p}" for p in rule.params])
            raise ValueError(f"unknown setting {key!r}; {name} takes: {valid}")
    return rules


def parse_threshold_args(items: Iterable[str]) -> dict[str, float]:
    """``["dead_relu=0.7", "vanishing_gradient.absolute=1e-8"]`` -> dict, with clear errors."""
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"threshold {item!r} must look like RULE=NUMBER, e.g. dead_relu=0.7")
        out[key.strip()] = value.strip()  # type: ignore[assignment]
    resolve(out)  # validate now
    return {k: float(v) for k, v in out.items()}


def rules_json(thresholds: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """The resolved rule table as JSON-ready dicts (for the tab's tooltips and the docs)."""
    return [rule.to_json() for rule in resolve(thresholds).values()]


__all__ = [
    "Finding", "Rule", "ThresholdLine", "RULES", "RULES_BY_NAME", "ISSUES", "SEVERITIES", "SEVERITY_RANK",
    "DIRECTIONS", "resolve", "parse_threshold_args", "rules_json", "word_of",
]
