"""The forward taps after the first logging step: ReLU modules that follow a layer directly are left untapped,
and their dead units, read from that layer's output instead, are exactly the ones their own output shows."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tbdiag import DiagnosticWriter
from tbdiag.reader import load_logdir


class Net(nn.Module):
    """ReLU modules in each position: after a layer, in place after a layer, shared between a layer's output
    and a residual sum (which no layer wrote, so that module keeps its tap)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(8, 16), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(16, 16), nn.ReLU(inplace=True)
        self.fc3, self.shared = nn.Linear(16, 16), nn.ReLU()
        self.head = nn.Linear(16, 3)
        with torch.no_grad():
            self.fc2.bias[:5] = -50.0  # five units of fc2 that never fire
            self.fc3.bias[:3] = -50.0

    def forward(self, x):
        h1 = self.act1(self.fc1(x))
        h2 = self.act2(self.fc2(h1))
        h3 = self.shared(self.fc3(h2))
        return self.head(self.shared(h3 + h1))


def _dead_fraction(y: torch.Tensor) -> float:
    return float((y.detach().amax(dim=0) <= 0).float().mean())


def test_untapped_relus_give_the_dead_units_their_own_outputs_show(tmp_path):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    # the test's own record of every ReLU output, by the row tbdiag attributes it to
    expected: dict[str, list[float]] = {"fc1": [], "fc2": [], "fc3": [], "shared": []}
    shared_calls = []
    model.act1.register_forward_hook(lambda m, a, y: expected["fc1"].append(_dead_fraction(y)))
    model.act2.register_forward_hook(lambda m, a, y: expected["fc2"].append(_dead_fraction(y)))

    def shared_hook(m, a, y):
        shared_calls.append(1)
        expected["fc3" if len(shared_calls) % 2 else "shared"].append(_dead_fraction(y))

    model.shared.register_forward_hook(shared_hook)
    writer = DiagnosticWriter(str(tmp_path))
    handle = writer.watch(model, opt, log_every=1, log_graph=False)  # (a trace would run the hooks above)
    g = torch.Generator().manual_seed(1)
    for _ in range(12):
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    by_name = {layer.name: layer for layer in handle.layers}
    assert by_name["act1"].untapped and by_name["act2"].untapped, "ReLU modules after a layer: no tap of their own"
    assert by_name["fc1"].relu_after and by_name["fc2"].relu_after
    assert not by_name["shared"].untapped, "a ReLU that also takes a sum keeps its tap"
    writer.close()

    (run,) = load_logdir(str(tmp_path))
    assert run.steps.tolist() == list(range(12))
    dead = run.column("dead_frac")
    for name, fractions in expected.items():
        got = dead[:, run.layer_names.index(name)]
        np.testing.assert_array_equal(got, np.array(fractions, dtype=np.float32), err_msg=name)
    assert dead[-1, run.layer_names.index("fc2")] >= 5 / 16  # the units that never fire are seen as dead
