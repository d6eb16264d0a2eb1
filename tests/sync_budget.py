"""How many device-host synchronisations each training step of a watched model may cost, and the check.

Shared by ``tests/test_cuda_sync.py`` (real syncs on a GPU, counted from the
warnings of ``torch.cuda.set_sync_debug_mode("warn")``) and
``tests/test_host_reads.py`` (on a CPU, the stand-in `host_reads.HostReads`
counts tbdiag's host reads of device values): the same training loops, the
same budget, the same assertions.

The budget, from step 0 on: no sync on a step that is not logged; one on a
logging step (its single transfer); with ``stop_on=("nonfinite",)`` one more
on every step (the sentinel's read, whatever the number of output tensors);
once weights or gradients hold NaN/Inf, one more on each logging step (their
exact counts).  Syncs the unwatched loop makes by itself (measured first) are
the user's and come on top.  So do, at step 0, the reads of the graph trace
itself, measured alone: none for plain models (asserted), but a Hugging Face
model's code reads values while ``torch.jit.trace`` records it, and the JIT's
inlining compares the trace's tensor constants (``aten.equal``): about 120
reads for the tiny GPT-2 here, and 9 for ``nn.TransformerEncoderLayer``'s checks of its inputs
(`TRACE_READS`).  After every step the watcher's
shield must be intact: a sync that raised inside a hook
(``set_sync_debug_mode("error")``) would otherwise only detach tbdiag, and the
count would look clean.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

LOG_EVERY = 3

#: (case, with an optimizer, stop_on): the loops both tests run.
MATRIX = [
    ("mlp", True, ()),
    ("seed_cnn", False, ()),
    ("resnet_bn_inplace", True, ()),
    ("dropout", True, ()),
    ("dropout", True, ("nonfinite",)),
    ("autocast_bf16", True, ()),
    ("hf_outputs", True, ()),
    ("hf_outputs", True, ("nonfinite",)),
    ("adam_fused_amsgrad", True, ()),  # Adam's state read at logging steps; its step counter a tensor
    ("hf_moe", True, ()),
    ("attention", True, ()),
]
#: Cases whose graph trace reads values on the host by itself (see the module docstring).
TRACE_READS = {"hf_outputs", "hf_moe", "attention"}
MATRIX_IDS = [f"{case}-{'opt' if opt else 'no_opt'}{'-stop_on' if stop else ''}" for case, opt, stop in MATRIX]

#: A step's count, and what the counter saw (file:line of each sync) for the failure message.
Counter = Callable[[Callable[[], None], int], "tuple[int, str]"]


def mlp(dropout: float = 0.0) -> nn.Module:
    # sigmoid/tanh too: the saturation statistics
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 128), nn.ReLU(), nn.Dropout(dropout), nn.Linear(128, 64),
                         nn.Tanh(), nn.Linear(64, 32), nn.Sigmoid(), nn.Linear(32, 10))


class EagerSelfAttention(nn.Module):
    """q·kᵀ, a causal mask, softmax, dropout: attention as research code writes it by hand."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) / (D // self.heads) ** 0.5
        scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        return self.out((F.dropout(F.softmax(scores, dim=-1), 0.1, self.training) @ v).transpose(1, 2).reshape(B, L, D))


class AttentionNet(nn.Module):
    """Token classifier with both attention paths tbdiag reads by hand-off: ``nn.TransformerEncoderLayer``
    (``F.multi_head_attention_forward``) and an eager softmax attention."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
        self.attn = EagerSelfAttention()
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.encoder(x)).mean(1))


@dataclass
class Loop:
    """A model, its optimizer (or None: a step is a backward) and one training step on a fixed batch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    batch: list[torch.Tensor]
    forward: Callable[[bool], torch.Tensor]  # the loss (``sick``: NaN in the input)
    call: tuple[tuple, dict]  # the model's arguments in a healthy step (what step 0 traces the graph with)
    plain_optimizer: torch.optim.Optimizer = field(init=False)

    def __post_init__(self) -> None:
        # without an optimizer for tbdiag, the loop still trains with one it does not see
        self.plain_optimizer = self.optimizer or torch.optim.SGD(self.model.parameters(), lr=0.01)

    def step(self, sick: bool = False) -> None:
        loss = self.forward(sick)
        self.plain_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.plain_optimizer.step()


def build(case: str, device: torch.device | str, with_optimizer: bool = True) -> Loop:
    """One of `MATRIX`'s loops on ``device``."""
    from scenarios import SeedCNN, SmallResNet

    device = torch.device(device)
    torch.manual_seed(0)
    x = torch.randn(16, 3, 16, 16, device=device)
    y = torch.randint(0, 10, (16,), device=device)
    autocast: Any = contextlib.nullcontext
    if case == "hf_outputs":  # a ModelOutput of several tensors: loss, logits, hidden states
        import transformers

        cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg).to(device)
        ids = torch.randint(0, 64, (8, 16), device=device)
        mask = torch.ones_like(ids)
        mask[:, -3:] = 0  # padded, and labelled: the padding_in_loss measurement runs too

        def forward(sick: bool) -> torch.Tensor:
            out = model(input_ids=ids, attention_mask=mask, labels=ids, output_hidden_states=True)
            return out.loss * float("nan") if sick else out.loss

        opt = torch.optim.AdamW(model.parameters(), lr=1e-3) if with_optimizer else None
        return Loop(model, opt, [ids, mask], forward,
                    ((), {"input_ids": ids, "attention_mask": mask, "labels": ids, "output_hidden_states": True}))
    if case == "hf_moe":  # a mixture of experts: its routers' loads and its blocks' outliers are measured
        import transformers

        cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                         num_experts_per_tok=2, max_position_embeddings=32, bos_token_id=0,
                                         eos_token_id=0, pad_token_id=None)
        model = transformers.MixtralForCausalLM(cfg).to(device)
        ids = torch.randint(0, 64, (8, 16), device=device)

        def forward(sick: bool) -> torch.Tensor:
            out = model(input_ids=ids, labels=ids)
            return out.loss * float("nan") if sick else out.loss

        opt = torch.optim.AdamW(model.parameters(), lr=1e-3) if with_optimizer else None
        return Loop(model, opt, [ids], forward, ((), {"input_ids": ids, "labels": ids}))
    if case in ("mlp", "dropout", "autocast_bf16", "adam_fused_amsgrad"):
        model = mlp(dropout=0.2 if case == "dropout" else 0.0)
        if case == "autocast_bf16":
            def autocast():
                return torch.autocast(device.type, dtype=torch.bfloat16)
    elif case == "seed_cnn":
        model, x = SeedCNN(), torch.randn(16, 3, 32, 32, device=device)
    elif case == "resnet_bn_inplace":
        model = SmallResNet()
    elif case == "attention":
        model, x = AttentionNet(), torch.randn(16, 12, 32, device=device)
    else:
        raise ValueError(case)
    model = model.to(device)

    def forward(sick: bool) -> torch.Tensor:
        with autocast():
            return F.cross_entropy(model(x * float("nan") if sick else x), y)

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if with_optimizer else None
    if case == "adam_fused_amsgrad" and with_optimizer:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True, fused=True)
    return Loop(model, opt, [x, y], forward, ((x,), {}))


def budget(step: int, log_every: int, stop_on: tuple = (), nonfinite_weights: bool = False) -> int:
    """The syncs tbdiag may add to training step ``step`` (counted from 0, the first watched step)."""
    logging = step % log_every == 0
    return int(logging) + int("nonfinite" in stop_on) + int(logging and nonfinite_weights)


def graph_trace(loop: Loop) -> Callable[[], Any]:
    """What step 0 runs to draw the graph, alone (to count its reads)."""
    from tbdiag.measure import graph

    return lambda: graph.graph_events(loop.model, *loop.call)


def check_steps(loop: Loop, handle: Any, count: Counter, steps: int, *, log_every: int = LOG_EVERY,
                stop_on: tuple = (), baseline: int = 0, sick_at: int | None = None, graph: int = 0) -> None:
    """Run ``steps`` watched steps from the watcher's current step; each must cost exactly its budget.

    ``sick_at``: that step's input is NaN (weights and gradients are NaN/Inf from then on).  ``graph``: the
    reads of the graph trace itself, at step 0.  Asserts, after every step, that the shield never tripped.
    """
    seen, wanted, details = [], [], []
    for _ in range(steps):
        step = handle.step
        want = baseline + budget(step, log_every, stop_on, nonfinite_weights=sick_at is not None and step > sick_at)
        want += graph if step == 0 else 0
        n, detail = count(lambda sick=step == sick_at: loop.step(sick=sick), want)
        assert handle.shield.fault is None and not handle.shield.tripped, \
            f"the shield tripped at step {step}: {handle.shield.fault!r}"
        seen.append(n)
        wanted.append(want)
        details.append(f"step {step}: {detail}")
    assert seen == wanted, f"syncs per step {seen}, budget {wanted}:\n" + "\n".join(details)
