"""The one guard between tbdiag and the user's training.

Every function tbdiag runs inside the user's code (module hooks, tensor
hooks, optimizer hooks, autograd callbacks, the activation spy, graph
logging) is wrapped by `Shield.guard`.  An exception inside tbdiag is caught,
reported once as a warning that names the cause and the way out, and the
watcher detaches itself; the user's forward, backward and ``optimizer.step()``
go on as if tbdiag had never been there.

Detaching happens in two moves, because PyTorch iterates some hook
dictionaries while it calls them (an optimizer's step hooks, a module's
always-called forward hooks on the exception path): removing a hook from the
very dictionary being iterated would itself raise into the user's code.  The
moment a fault is caught every guarded function turns into a no-op; the hooks
are then removed at the first point where that is safe (`Shield.sweep`),
at the latest by ``remove()`` / ``writer.close()``.

Guarded functions are also hidden from ``torch.compile`` (`torch.compiler.disable`):
Dynamo would otherwise trace them once and bake the step counter and the
statistics into a compiled graph.
"""

from __future__ import annotations

import functools
import traceback
import warnings
from typing import Any, Callable, TypeVar

import torch

from .live import TrainingHealthError

F = TypeVar("F", bound=Callable[..., Any])

#: What the user can do about a fault in each entry point.
WAY_OUT = {
    "graph": "pass watch(..., log_graph=False) to skip the graph",
    "activation spy": "pass watch(..., activation_histograms=False) if the fault is in an activation",
}
_DEFAULT_WAY_OUT = "pass fewer options to watch() (histograms=False, images_every=0) or leave this model unwatched"


class Shield:
    """Catches what tbdiag raises inside the user's code; warns once; lets the owner detach.

    ``detach(entry, args)`` is the owner's clean-up: called once the shield
    trips (or is stopped) and again from every later guarded call, with that
    call's arguments, until it reports that nothing is left (``True``).  It
    must remove only what is safe to remove from inside ``entry`` and never
    raise.
    """

    def __init__(self, describe: Callable[[], str], detach: Callable[[str, tuple], bool]):
        self._describe = describe
        self._detach = detach
        self.tripped = False
        self.fault: BaseException | None = None
        self._swept = False

    def guard(self, entry: str, fn: F) -> F:
        """``fn`` made safe to run inside the user's code; returns None once the shield tripped or on a fault."""

        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if self.tripped:
                self.sweep(entry, args)
                return None
            try:
                return fn(*args, **kwargs)
            except TrainingHealthError:  # watch(..., stop_on=...): the user asked for this one
                raise
            except Exception as e:  # anything of ours: never the user's problem
                self.trip(entry, e, args)
                return None

        return torch.compiler.disable(guarded)  # type: ignore[return-value]

    def stop(self, entry: str = "remove") -> None:
        """Stop observing on purpose (``handle.remove()``): no warning, same clean-up."""
        self.tripped = True
        self.sweep(entry)

    def trip(self, entry: str, error: BaseException, args: tuple = ()) -> None:
        """Stop observing: warn once, then detach as far as is safe from ``entry``."""
        if not self.tripped:
            self.tripped = True
            self.fault = error
            try:
                where = traceback.extract_tb(error.__traceback__)[-1]
                origin = f" at {where.filename.rsplit('/', 1)[-1]}:{where.lineno}"
            except Exception:
                origin = ""
            try:
                what = self._describe()
            except Exception:
                what = "the model"
            warnings.warn(
                f"tbdiag stopped watching {what} after an internal error in its {entry} "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}{origin}). "
                f"Training goes on unaffected and what was logged so far is kept. To go on without the fault: "
                f"{WAY_OUT.get(entry, _DEFAULT_WAY_OUT)}; please report it with this message.",
                RuntimeWarning,
                stacklevel=3,
            )
        self.sweep(entry, args)

    def sweep(self, entry: str, args: tuple = ()) -> None:
        """Remove what is safe to remove from inside ``entry`` (no-op once everything is gone)."""
        if self._swept:
            return
        try:
            self._swept = bool(self._detach(entry, args))
        except Exception:  # clean-up must never raise into training
            pass
