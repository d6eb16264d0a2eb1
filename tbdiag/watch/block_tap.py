"""Hooks on the repeated blocks and the mixture-of-experts routers, for one logging-step training forward.

Installed with the layer taps when a logging step's training forward begins
and removed when it ends, so a non-logging step never pays for them.  Block
outputs give the step's massive-activation statistics (the largest
max|h| / median|h| over blocks, chosen on the device); router outputs give
each router's expert load, on its layer row (`tbdiag.measure.blocks`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..measure import blocks, stats
from ..measure.layers import Layer, first_tensor
from ..measure.probe import StepProbe, no_autocast


class BlockTap:
    """See the module docstring; ``guard`` makes each hook safe inside the user's forward."""

    def __init__(self, guard: Callable[[str, Callable], Callable]):
        self.blocks: list[tuple[str, torch.nn.Module]] = []
        self.routers: list[tuple[blocks.Router, Layer]] = []
        self.hooks: list[tuple[str, Any]] = []  # ("post", handle), for the watcher's detach
        self._probe: StepProbe | None = None
        self._seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # block position -> (max, median)
        self._routed: set[int] = set()  # router rows measured in this forward
        self._guard = guard
        self._block_hook: Callable = self._on_block
        self._router_hook: Callable = self._on_router

    def discover(self, model: torch.nn.Module, layers: list[Layer]) -> None:
        """Find the blocks and the routers (routers that are rows of the layer table); guard the hooks (at
        ``watch()``'s set-up, where a fault leaves nothing behind)."""
        self._block_hook = self._guard("forward hook", self._on_block)
        self._router_hook = self._guard("forward hook", self._on_router)
        self.blocks = blocks.repeated_blocks(model)
        by_module = {id(layer.module): layer for layer in layers}
        self.routers = [(r, by_module[id(r.module)]) for r in blocks.routers(model) if id(r.module) in by_module]

    @property
    def block_names(self) -> list[str]:
        return [name for name, _ in self.blocks]

    def open(self, probe: StepProbe) -> None:
        self._probe = probe
        self._seen.clear()
        self._routed.clear()
        for i, (_, module) in enumerate(self.blocks):
            hook = lambda m, args, out, i=i: self._block_hook(i, out)
            self.hooks.append(("post", module.register_forward_hook(hook)))
        for router, layer in self.routers:
            hook = lambda m, args, out, router=router, layer=layer: self._router_hook(router, layer, out)
            self.hooks.append(("post", router.module.register_forward_hook(hook)))

    def _on_block(self, position: int, out: Any) -> None:
        h = first_tensor(out)
        if position in self._seen or h is None or not h.is_floating_point() or h.dim() != 3 or h.numel() == 0:
            return  # token sequences only ([batch, tokens, width]): a CNN stage's maps are not a residual stream
        with torch.no_grad(), no_autocast(h):
            self._seen[position] = blocks.massive_stats(h)

    def _on_router(self, router: blocks.Router, layer: Layer, out: Any) -> None:
        if self._probe is None or layer.row in self._routed:
            return
        chosen = blocks.choices(out, router.num_experts, router.top_k)
        if chosen is None or chosen.numel() == 0:
            return
        self._routed.add(layer.row)
        with torch.no_grad():
            self._probe.add("experts", layer.row, blocks.expert_load(chosen, router.num_experts))

    def close(self) -> None:
        """Remove the hooks; the step's largest block outlier goes into the probe."""
        for _, h in self.hooks:
            h.remove()
        self.hooks.clear()
        probe, self._probe = self._probe, None
        if probe is None or not self._seen:
            return
        positions = sorted(self._seen)
        with torch.no_grad():
            device = probe.gather_device(self._seen[positions[0]][0])
            peak = torch.stack(stats.gather([self._seen[i][0] for i in positions], device))
            median = torch.stack(stats.gather([self._seen[i][1] for i in positions], device))
            ratio, worst = (peak / median.clamp(min=torch.finfo(torch.float32).tiny)).max(dim=0)
            # picked on the device (indexing by a device value would read it on the host)
            at = torch.tensor(positions, dtype=torch.float32, device=device) \
                if positions != list(range(len(positions))) else torch.arange(len(positions), device=device)
            probe.add_model("massive_act_ratio", ratio)
            probe.add_model("massive_act_max", peak.gather(0, worst.reshape(1)))
            probe.add_model("massive_act_block", at.gather(0, worst.reshape(1)).float())
        self._seen.clear()


__all__ = ["BlockTap"]
