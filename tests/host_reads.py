"""Host reads of tensor values made by tbdiag: a stand-in, visible on a CPU, for device-host synchronisations.

On an accelerator every read of a tensor's value by the host waits for the
device: ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``, an f-string,
``.tolist()``, ``.cpu()`` / ``.to("cpu")``, ``.numpy()``, ``np.asarray(t)``,
``torch.equal``, ``nonzero``, ``masked_select``, boolean indexing, a copy into
host memory.  On a CPU none of them waits, so ``torch.cuda.set_sync_debug_mode``
has nothing to see there.  `HostReads` sees them all: a `TorchDispatchMode` for
the aten ops that read values on the host (``aten._local_scalar_dense`` behind
``item``/``float``/``bool``/``int``, ``aten.equal``, ``aten.nonzero``, boolean
``aten.index``, ...) and wrappers on the ``torch.Tensor`` methods that read
without an aten op on a CPU tensor (``cpu``, ``to``, ``tolist``, ``numpy``,
``__array__``).

What counts, so that a CPU run counts what an accelerator run would sync on:

- reads of *device* values only: the model's parameters and buffers, the tensors
  passed to ``HostReads(...)`` (the batches), anything an op computes from one of
  those, and tensors made with an explicit ``device=`` (``torch.full(...,
  device=x.device)``).  A tensor that lives on the host on any machine (the
  random-number generator's state, ``torch.tensor(3.0)``) is never a sync.
- reads made by tbdiag: the innermost tbdiag frame on the stack decides, unless
  tbdiag is only passing the user's own call through (its activation spy's
  ``__torch_function__``, the replay and the graph trace of the user's forward):
  a read in the user's forward or training loop is the user's business.  Code
  that tbdiag calls (a hook swapped in by a test) counts as tbdiag's.
- a tensor read again before it changes (``.cpu().numpy()``) counts once.
- ``transfers``: functions counted as one read per call, whatever they read inside
  (``stats.to_host``: on an accelerator one concatenation and one copy; on a CPU
  it passes the host values through, part by part).
- ``cpu_branches``: tbdiag functions that only run on CPU tensors and read on the
  host by design (their accelerator branches read nothing; ``tests/test_cuda_sync.py``
  checks those on a GPU).  Reads inside them are listed in ``exempt``, not counted.
- ``outside_mode``: functions run with the dispatch mode suspended, their reads
  counted by the profiler instead (every value-reading aten op, the outermost of
  a nest, as tbdiag's: no device values to tell apart there).  ``torch.jit.trace``
  under a Python dispatch mode records the mode's calls, and its passes then
  compare tensors (``aten.equal``) that a plain trace never compares: tbdiag's
  graph trace runs as it would unwatched.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import tbdiag

TBDIAG_DIR = os.path.dirname(os.path.abspath(tbdiag.__file__)) + os.sep
TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_HERE = os.path.abspath(__file__)

#: tbdiag frames that only pass the user's own code through: (file below tbdiag/, function name).
PASS_THROUGH = {
    ("watch/forward_tap.py", "__torch_function__"),  # the activation spy runs the user's op
    ("watch/attention_tap.py", "__torch_function__"),  # the attention kernel spy runs the user's op
    ("watch/sentinel.py", "_replay"),  # the one replay of the user's forward
    ("measure/graph.py", "forward"),  # the graph trace's call of the user's model
}

#: aten ops whose kernels read tensor values on the host (on an accelerator: a sync), by overload packet.
_READ_OPS = {
    "_local_scalar_dense",  # item(), float(t), int(t), bool(t), format(t), operator.index(t)
    "equal", "nonzero", "nonzero_static", "masked_select", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "allclose", "item", "is_nonzero",
}
_FACTORY_KWARG = "device"

#: torch.Tensor methods that read values without an aten op on a CPU tensor.
_METHODS = ("cpu", "to", "tolist", "numpy", "__array__")


@dataclass
class Read:
    what: str  # the op or method
    where: str  # "file:line function" of the tbdiag frame (or the code tbdiag called) that read
    stack: str = ""  # the frames outside torch, innermost last


def _profiled_read(event: Any, nested: bool = False) -> bool:
    """A profiler event of an aten op in `_READ_OPS` (or, ``nested``, one inside such an op)."""
    while event is not None:
        if event.name.startswith("aten::") and event.name[len("aten::"):] in _READ_OPS:
            return True
        if not nested:
            return False
        event = event.cpu_parent
    return False


def _is_cpu_target(args: tuple, kwargs: dict) -> bool:
    """Whether a ``Tensor.to(...)`` call asks for the CPU (a device, a device's name, or a tensor there)."""
    for a in [*args, kwargs.get("device")]:
        if isinstance(a, torch.Tensor):
            return a.device.type == "cpu"
        if isinstance(a, (str, torch.device)):
            return torch.device(a).type == "cpu"
    return False


class HostReads(TorchDispatchMode):
    """Counts tbdiag's host reads of device values on this thread while active (see the module docstring).

    ``reads``: what counted, in order; ``exempt``: what `cpu_branches` read.
    """

    def __init__(self, *device_tensors: Any, model: torch.nn.Module | None = None,
                 transfers: Iterable[tuple[Any, str]] = (), cpu_branches: Callable[[str, str], bool] | None = None,
                 outside_mode: Iterable[tuple[Any, str]] = ()):
        super().__init__()
        self.reads: list[Read] = []
        self.exempt: list[Read] = []
        self._device: dict[int, weakref.ref] = {}
        self._read_at: dict[int, tuple[weakref.ref, int]] = {}  # id -> (the tensor, its version when read)
        self._thread = threading.get_ident()
        self._transfers = list(transfers)
        self._outside_mode = list(outside_mode)
        self._inside_transfer = 0
        self._cpu_branches = cpu_branches
        self._saved: list[tuple[Any, str, Any]] = []
        for t in pytree.tree_leaves(device_tensors):
            if isinstance(t, torch.Tensor):
                self.mark(t)
        if model is not None:
            for t in [*model.parameters(), *model.buffers()]:
                self.mark(t)

    # ------------------------------------------------------------ device values

    def mark(self, t: torch.Tensor) -> None:
        """``t`` holds device values (on an accelerator it would live there)."""
        self._device[id(t)] = weakref.ref(t)

    def is_device(self, t: Any) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        ref = self._device.get(id(t))
        return ref is not None and ref() is t

    # ------------------------------------------------------------ counting

    def count(self, mark: int = 0) -> int:
        """Reads counted since ``mark`` (a former ``len(self.reads)``)."""
        return len(self.reads) - mark

    def _where(self) -> tuple[str, str] | None:
        """The reading frame ("file:line function", file below tbdiag/) when the read is tbdiag's, else None."""
        frame = sys._getframe(2)
        first_outside: Any = None  # innermost frame of neither torch nor this file
        while frame is not None:
            path = os.path.abspath(frame.f_code.co_filename)
            if path == _HERE or path.startswith(TORCH_DIR):
                frame = frame.f_back
                continue
            if path.startswith(TBDIAG_DIR):
                rel = path[len(TBDIAG_DIR):].replace(os.sep, "/")
                if (rel, frame.f_code.co_name) in PASS_THROUGH:
                    return None
                site = first_outside if first_outside is not None else frame
                site_path = os.path.abspath(site.f_code.co_filename)
                shown = site_path[len(TBDIAG_DIR):] if site_path.startswith(TBDIAG_DIR) else os.path.basename(site_path)
                return f"{shown}:{site.f_lineno} {site.f_code.co_name}", rel + ":" + frame.f_code.co_name
            if first_outside is None:
                first_outside = frame
            frame = frame.f_back
        return None

    def _note(self, what: str, t: Any) -> None:
        if threading.get_ident() != self._thread or self._inside_transfer or not self.is_device(t):
            return
        version = t._version
        ref, seen = self._read_at.get(id(t), (None, None))
        if ref is not None and ref() is t and seen == version:
            return  # read before and unchanged: its value is on the host already
        where = self._where()
        if where is None:
            return
        self._read_at[id(t)] = (weakref.ref(t), version)
        read = Read(what, where[0], _stack())
        if self._cpu_branches is not None and self._cpu_branches(*where[1].split(":")):
            self.exempt.append(read)
        else:
            self.reads.append(read)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if name in _READ_OPS:
            self._note(f"aten.{name}", next((t for t in inputs if self.is_device(t)), None))
        elif name in ("index", "index_put", "index_put_") and any(
                t.dtype in (torch.bool, torch.uint8) for t in inputs[1:]):  # a boolean mask: its nonzero
            self._note(f"aten.{name} (boolean mask)", next((t for t in inputs if self.is_device(t)), None))
        elif name in ("_to_copy", "copy_"):  # a copy into host memory from an accelerator
            dst = kwargs.get("device") if name == "_to_copy" else args[0].device
            src = args[0] if name == "_to_copy" else args[1]
            if dst is not None and torch.device(dst).type == "cpu" and src.device.type != "cpu":
                self._note(f"aten.{name} to the host", src)
        out = func(*args, **kwargs)
        device = any(self.is_device(t) for t in inputs) or kwargs.get(_FACTORY_KWARG) is not None
        if device:
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.mark(t)
        return out

    # ------------------------------------------------------------ set-up

    def __enter__(self):
        counter = self

        def wrap(name: str, original: Callable) -> Callable:
            def method(self, *args, **kwargs):
                if name != "to" or _is_cpu_target(args, kwargs):
                    counter._note(f"Tensor.{name}", self)
                return original(self, *args, **kwargs)
            method.__name__ = name
            return method

        for name in _METHODS:
            own = torch.Tensor.__dict__.get(name)
            self._saved.append((torch.Tensor, name, own))
            setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))

        for owner, name in self._transfers:
            original = getattr(owner, name)

            def transfer(*args, __original=original, __name=name, **kwargs):
                parts = next((a for a in args if isinstance(a, (list, tuple))), ())
                if threading.get_ident() == counter._thread and counter._inside_transfer == 0 and any(
                        counter.is_device(p) for p in parts):
                    where = counter._where()
                    if where is not None:
                        counter.reads.append(Read(__name, where[0]))
                counter._inside_transfer += threading.get_ident() == counter._thread
                try:
                    return __original(*args, **kwargs)
                finally:
                    counter._inside_transfer -= threading.get_ident() == counter._thread

            self._saved.append((owner, name, owner.__dict__.get(name) if isinstance(owner, type) else original))
            setattr(owner, name, transfer)

        for owner, name in self._outside_mode:
            original = getattr(owner, name)

            def unwatched(*args, __original=original, __name=name, **kwargs):
                if threading.get_ident() != counter._thread:
                    return __original(*args, **kwargs)
                with _disable_current_modes(), profile(activities=[ProfilerActivity.CPU]) as prof:
                    result = __original(*args, **kwargs)
                where = counter._where()
                for e in prof.events():
                    if _profiled_read(e) and not _profiled_read(e.cpu_parent, nested=True) and where is not None:
                        counter.reads.append(Read(e.name, f"{where[0]} (in {__name})"))
                return result

            self._saved.append((owner, name, owner.__dict__.get(name) if isinstance(owner, type) else original))
            setattr(owner, name, unwatched)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for owner, name, original in reversed(self._saved):
                if original is None:
                    delattr(owner, name)
                else:
                    setattr(owner, name, original)
            self._saved.clear()


def profiled_reads(fn: Callable[[], Any]) -> int:
    """Value-reading aten ops (the outermost of a nest) that ``fn()`` runs, whoever runs them: the profiler's
    count, with no dispatch mode to change what runs."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(_profiled_read(e) and not _profiled_read(e.cpu_parent, nested=True) for e in prof.events())


def _stack() -> str:
    frames = [f for f in traceback.extract_stack()[:-3]
              if not os.path.abspath(f.filename).startswith(TORCH_DIR) and os.path.abspath(f.filename) != _HERE]
    return " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames[-8:]))


def report(reads: list[Read]) -> str:
    return "; ".join(f"{r.what} at {r.where}" for r in reads) or "none"
