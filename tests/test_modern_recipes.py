"""Modern training recipes (tests/recipes.py): healthy runs draw no warning, each sick twin is named.

Each healthy recipe trains a small randomly initialised model of one family the
way that family is trained today (AdamW + warm-up + cosine + clipping, SGD +
StepLR or cosine for BatchNorm CNNs and a bouncing MLP, Adafactor for T5 with
and without a learning rate, bf16 autocast, the Hugging Face Trainer) and must learn while
`tbdiag.report` finds nothing at warning or error.  Each sick twin repeats a
healthy recipe with one mistake, and the report must name that mistake (on the
layer where it lives, for layer-level mistakes).
"""

from __future__ import annotations

import time
import warnings

import pytest

import tbdiag

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import recipes

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # sized and timed for one CPU thread

SERIOUS = ("warning", "error")
TBDIAG_FAULTS = ("tbdiag stopped watching", "tbdiag could not write")


def _describe(findings) -> str:
    return "\n".join(f"  {f.issue} on {f.layer} [{f.severity}] steps {f.first_step}-{f.last_step} value={f.value:.4g}: "
                     f"{f.message}" for f in findings) or "  (none)"


def _train_and_report(name: str, tmp_path) -> tuple[float, float, list, list[str]]:
    """Run recipe ``name`` into ``tmp_path``; (first loss, last loss, findings, tbdiag's warnings)."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, last = recipes.ALL[name](str(tmp_path))
    seconds = time.perf_counter() - start
    notes = [str(w.message) for w in caught if "tbdiag" in str(w.message)]
    findings = tbdiag.report(str(tmp_path))
    print(f"\n[{name}] loss {first:.4f} -> {last:.4f} ({last / first:.2f}x) in {seconds:.1f}s")
    for note in notes:
        print(f"[{name}] tbdiag warned: {note}")
    print(f"[{name}] findings:\n{_describe(findings)}")
    return first, last, findings, notes


@pytest.mark.parametrize("name", list(recipes.HEALTHY))
def test_healthy_recipe_learns_and_draws_no_warning(name, tmp_path):
    first, last, findings, notes = _train_and_report(name, tmp_path)
    assert last < 0.7 * first, f"{name} did not learn: loss {first:.4f} -> {last:.4f}"
    assert notes == [], f"tbdiag printed warnings on {name}, a healthy run: {notes}"
    serious = [f for f in findings
               if f.severity in SERIOUS and f.issue != "input_bound"]  # input_bound: wall-clock, not the model
    assert serious == [], f"{name}, a healthy run, drew warnings:\n{_describe(serious)}"


def _named(findings, issues, layer=lambda layer: True, severities=SERIOUS):
    return [f for f in findings if f.issue in issues and f.severity in severities and layer(f.layer)]


def _check_sick(name, tmp_path, issues, layer=lambda layer: True, what="") -> list:
    _, _, findings, notes = _train_and_report(name, tmp_path)
    faults = [n for n in notes if any(fault in n for fault in TBDIAG_FAULTS)]
    assert not faults, faults
    hits = _named(findings, issues, layer)
    assert hits, f"{name}: expected {' or '.join(issues)}{what} at warning or error; the report said:\n" \
                 f"{_describe(findings)}"
    return findings


def test_gpt2_lr_too_high_is_activation_growth_from_the_first_intervals(tmp_path):
    """lr 0.1 with no warm-up: the loss still falls (clipping), but the activations blow up at once."""
    findings = _check_sick("gpt2_lr_too_high", tmp_path, ("activation_growth",),
                           lambda layer: layer is not None and layer.startswith("transformer.h."),
                           " on the transformer blocks")
    first = min(f.first_step for f in _named(findings, ("activation_growth",)))
    assert first <= 3 * recipes.LOG_EVERY, f"named only from step {first}"


def test_gpt2_lr_too_low_is_update_too_small(tmp_path):
    _check_sick("gpt2_lr_too_low", tmp_path, ("update_too_small",), lambda layer: layer is not None,
                " on the model's layers")


def test_gpt2_missing_zero_grad_is_stale_gradients(tmp_path):
    _check_sick("gpt2_no_zero_grad", tmp_path, ("stale_gradients",))


def test_gpt2_in_eval_mode_is_eval_mode_training(tmp_path):
    _check_sick("gpt2_eval_mode", tmp_path, ("eval_mode_training",))


def test_gpt2_dead_mlp_block_is_named(tmp_path):
    """Block 6's c_fc bias at -20: its GELU outputs 0 and passes back no gradient."""
    block = ("transformer.h.6.mlp.c_fc", "transformer.h.6.mlp.act")
    findings = _check_sick("gpt2_dead_mlp", tmp_path, ("dead_relu", "no_gradient"), lambda layer: layer in block,
                           f" on {' or '.join(block)}")
    elsewhere = [f for f in _named(findings, ("dead_relu", "no_gradient"))
                 if f.layer is not None and ".h.6.mlp." not in f.layer]
    assert not elsewhere, f"healthy blocks named as dead:\n{_describe(elsewhere)}"


def test_bert_detached_backbone_is_no_gradient(tmp_path):
    """The encoder's output is detached, yet its parameters require grad and are in the optimizer."""
    findings = _check_sick("bert_detached_backbone", tmp_path, ("no_gradient",),
                           lambda layer: layer is not None and layer.startswith("bert.encoder."),
                           " on the encoder's layers (bert.encoder.*)")
    head = [f for f in _named(findings, ("no_gradient",)) if f.layer == "classifier"]
    assert not head, f"the classifier, which does get gradients, was named:\n{_describe(head)}"


def test_bert_all_zero_attention_mask_is_no_gradient_on_queries_and_keys(tmp_path):
    """Every position masked: the attention is uniform, and queries and keys get exactly zero gradient."""
    findings = _check_sick("bert_zero_attention_mask", tmp_path, ("no_gradient",),
                           lambda layer: layer is not None and layer.endswith((".attention.self.query",
                                                                               ".attention.self.key")),
                           " on the attention's queries and keys")
    repeated = _named(findings, ("vanishing_gradient",))
    assert not repeated, f"exact zeros are no_gradient's to name, not also vanishing:\n{_describe(repeated)}"


def test_vit_softmax_head_is_softmax_output(tmp_path):
    _check_sick("vit_softmax_head", tmp_path, ("softmax_output",))


@pytest.mark.xfail(strict=True, reason="no signature found yet: the model's output is clean logits, and the "
                   "loss floor ln(1 + (C-1)/e) is not reached within a short run")
def test_vit_softmax_in_the_loss_line_is_softmax_output(tmp_path):
    """``cross_entropy(logits.softmax(-1), y)``: the same mistake as a softmax head, written in the loss line."""
    _check_sick("vit_softmax_in_loss", tmp_path, ("softmax_output",))


def test_mobilenet_v2_lr_too_high_is_loss_oscillation_and_activation_growth(tmp_path):
    """SGD at 8x the healthy rate (0.16): the loss swings between ~3 and ~10, and with BatchNorm after every
    convolution the stem's convolutions grow their outputs by 100-10,000x (their weights blow up; BN hides it
    from the loss)."""
    findings = _check_sick("mobilenet_v2_lr_too_high", tmp_path, ("loss_oscillation",))
    stem = _named(findings, ("activation_growth",),
                  lambda layer: layer is not None and layer.startswith("mobilenet_v2.conv_stem."))
    assert stem, f"expected activation_growth on the stem (mobilenet_v2.conv_stem.*); the report said:\n" \
                 f"{_describe(findings)}"


def test_gpt2_bad_batch_between_logging_steps_is_a_gradient_spike_at_its_step(tmp_path):
    """Step 137's labels are shifted by half the vocabulary: the gradient norm jumps there, between logging steps,
    and the loss at that step is several times its median (the clipping at 1.0 comes after the norm is taken)."""
    findings = _check_sick("gpt2_bad_batch", tmp_path, ("gradient_spike",))
    (f,) = _named(findings, ("gradient_spike",))
    assert f.first_step == 137, _describe([f])


def test_mixtral_biased_router_without_balancing_loss_is_expert_collapse(tmp_path):
    findings = _check_sick("mixtral_collapsed_router", tmp_path, ("expert_collapse",),
                           lambda layer: layer == "model.layers.0.mlp.gate", " on the first router")
    assert not _named(findings, ("expert_collapse",), lambda layer: not layer.endswith(".mlp.gate"))
