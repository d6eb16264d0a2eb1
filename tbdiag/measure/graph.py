"""The model graph for TensorBoard's Graphs tab: traced from a real call, or the module tree when tracing fails.

Tracing reruns the model once, so it must leave no trace on training: it runs
in eval mode (no BatchNorm statistics updated), without gradients, outside
autocast (the tracer cannot record autocast's casts), under a forked RNG (no
random numbers consumed), on the unwrapped module (no DDP collectives on one
rank), with the call's real positional *and* keyword arguments.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import Any

import torch
from tensorboard.compat.proto import event_pb2, graph_pb2, node_def_pb2, versions_pb2
from torch import nn
from torch.utils import _pytree as pytree


def _tensor_outputs(output: Any) -> Any:
    """The tensors of a model's output as a flat tuple (HF ``ModelOutput``, dicts, nested tuples)."""
    if isinstance(output, torch.Tensor):
        return output
    to_tuple = getattr(output, "to_tuple", None)
    if callable(to_tuple):
        output = to_tuple()
    if isinstance(output, dict):
        output = tuple(output.values())
    if isinstance(output, (tuple, list)):
        flat = []
        for item in output:
            item = _tensor_outputs(item)
            if isinstance(item, torch.Tensor):
                flat.append(item)
            elif isinstance(item, tuple):
                flat.extend(item)
        return tuple(flat)
    return output


class _BoundCall(nn.Module):
    """The model called with fixed keyword arguments and non-tensor values, taking only tensors.

    ``torch.jit.trace`` passes positional tensors only; binding the rest lets
    models called as ``model(input_ids=..., labels=...)`` be traced.
    """

    def __init__(self, model: nn.Module, args: tuple, kwargs: dict):
        super().__init__()
        self.model = model
        leaves, self._spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        self._leaves = leaves
        self._tensor_at = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        self.inputs = tuple(leaves[i] for i in self._tensor_at)

    def forward(self, *tensors: torch.Tensor) -> Any:
        leaves = list(self._leaves)
        for i, t in zip(self._tensor_at, tensors):
            leaves[i] = t
        args, kwargs = pytree.tree_unflatten(leaves, self._spec)
        return _tensor_outputs(self.model(*args, **kwargs))


@contextlib.contextmanager
def _untouched(model: nn.Module):
    """No gradients, no autocast, no RNG draws, no prints from the tracer; restores everything after."""
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"} - {None})
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=devices))
        stack.enter_context(torch.no_grad())
        for device_type in ("cpu", "cuda"):
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))  # the tracer prints its failures
        yield


def _describe_tensors(value: Any) -> Any:
    """A node attribute with its tensors as their dtype and shape: printing a tensor reads its values."""
    return pytree.tree_map_only(torch.Tensor, lambda t: f"Tensor({str(t.dtype)[6:]}, {list(t.shape)})", value)


@contextlib.contextmanager
def _constants_unread(tb_graph: Any):
    """TensorBoard's conversion writes each node's attributes as ``str`` of their values: for the tensor
    constants of a trace (masks, scales, positions: 34 host reads for the 2-layer GPT-2 of
    ``tests/sync_budget.py``) a read of their values, a device sync each on an accelerator.  Their dtype
    and shape are written instead."""
    original = tb_graph._node_get
    tb_graph._node_get = lambda node, key: _describe_tensors(original(node, key))
    try:
        yield
    finally:
        tb_graph._node_get = original


def _graph(module: nn.Module, inputs: tuple, strict: bool) -> tuple[graph_pb2.GraphDef, Any]:
    """TensorBoard's ``add_graph`` conversion (``torch.utils.tensorboard._pytorch_graph.graph``) without host
    reads of device values.

    ``torch.jit.trace``'s default check (``check_trace=True``) runs the model twice more and compares the
    outputs on the host: three forwards instead of one, and device syncs, at the first step.  The trace's
    tensor constants are described, not printed (`_constants_unread`).  What is left reads nothing for
    plain models; a Hugging Face model's own code reads values while it is traced, and the JIT's inlining
    compares the trace's tensor constants (``aten::equal``): about 120 reads for that GPT-2.
    """
    from torch.utils.tensorboard import _pytorch_graph as tb_graph

    with tb_graph._set_model_to_eval(module):
        traced = torch.jit.trace(module, inputs, strict=strict, check_trace=False)
        graph = traced.graph
        torch._C._jit_pass_inline(graph)
    with _constants_unread(tb_graph):
        nodes = tb_graph.parse(graph, traced, inputs)
    run_metadata = tb_graph.RunMetadata(
        step_stats=tb_graph.StepStats(dev_stats=[tb_graph.DeviceStepStats(device="/device:CPU:0")]))
    return graph_pb2.GraphDef(node=nodes, versions=versions_pb2.VersionDef(producer=22)), run_metadata


def trace(model: nn.Module, args: tuple, kwargs: dict | None = None) -> tuple[graph_pb2.GraphDef, Any, list[str]]:
    """``(GraphDef, RunMetadata, tracer warnings)`` of one call; raises what ``torch.jit.trace`` raises."""
    kwargs = kwargs or {}
    attempts: list[tuple[nn.Module, tuple, bool]] = []
    if not kwargs:
        attempts += [(model, tuple(args), True), (model, tuple(args), False)]
    bound = _BoundCall(model, args, kwargs)
    attempts.append((bound, bound.inputs, False))
    errors: list[Exception] = []
    for module, inputs, strict in attempts:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with _untouched(model):
                    graph_def, run_metadata = _graph(module, inputs, strict)
            except Exception as e:  # jit.trace raises many kinds of errors
                errors.append(e)
                graph_def = None
        for w in caught:  # tbdiag's own warnings raised during the trace (a tripped shield) still reach the user,
            # and so do those of torch.cuda.set_sync_debug_mode("warn"): a sync in the trace is one in the step
            if "tbdiag" in str(w.message) or "called a synchronizing" in str(w.message):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if graph_def is not None:
            notes = [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
            if module is bound:
                _root_named_after(graph_def, f"{type(bound).__name__}/{type(model).__name__}[model]",
                                  type(model).__name__)
            return graph_def, run_metadata, notes
    raise errors[-1]


def _root_named_after(graph_def: graph_pb2.GraphDef, wrapper: str, name: str) -> None:
    """Rename the scope ``wrapper`` (the internal `_BoundCall` around the user's model) to the model's own name,
    in every node and every reference to one: the Graphs tab's root is the user's model."""
    own = wrapper.split("/", 1)[0] + "/"  # the binding's own nodes, in the wrapper's scope

    def renamed(text: str) -> str:
        head = text[:1] if text.startswith("^") else ""  # a control input
        body = text[len(head):]
        if body.startswith(wrapper):
            return head + name + body[len(wrapper):]
        return head + name + "/" + body[len(own):] if body.startswith(own) else text

    for node in graph_def.node:
        node.name = renamed(node.name)
        node.input[:] = [renamed(i) for i in node.input]


def module_tree_graph(model: nn.Module) -> graph_pb2.GraphDef:
    """A GraphDef of the module hierarchy: one node per module, leaves chained in definition order."""
    nodes = []
    previous_leaf = None
    for name, module in model.named_modules():
        if not name:
            continue
        path = name.replace(".", "/")
        leaf = next(iter(module.children()), None) is None
        node = node_def_pb2.NodeDef(name=path, op=type(module).__name__)
        if leaf and previous_leaf is not None:
            node.input.append(previous_leaf)
        if leaf:
            previous_leaf = path
        nodes.append(node)
    if not nodes:  # a model without submodules: one node for itself
        nodes.append(node_def_pb2.NodeDef(name=type(model).__name__, op=type(model).__name__))
    return graph_pb2.GraphDef(node=nodes, versions=versions_pb2.VersionDef(producer=22))


def graph_events(model: nn.Module, args: tuple, kwargs: dict | None, traceable: bool = True) -> list[event_pb2.Event]:
    """The events that put ``model``'s graph in the Graphs tab; warns only when it falls back to the module tree.

    ``traceable=False`` skips tracing (a sharded model, whose forward runs
    collectives that only one rank would join) and logs the module tree.
    """
    if traceable:
        try:
            graph_def, run_metadata, notes = trace(model, args, kwargs)
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else ""
            warnings.warn(
                f"tbdiag: torch.jit.trace could not trace the model ({type(e).__name__}: {first}); the Graphs tab "
                "shows the module tree instead. Training is not affected; watch(..., log_graph=False) skips the graph.",
                RuntimeWarning, stacklevel=2,
            )
        else:
            # The tracer's notes (data-dependent control flow drawn along the path this call took) are not passed
            # on: the graph was drawn, training is unaffected, and every Hugging Face model would print one.
            del notes
            tagged = event_pb2.TaggedRunMetadata(tag="step1", run_metadata=run_metadata.SerializeToString())
            return [event_pb2.Event(graph_def=graph_def.SerializeToString()),
                    event_pb2.Event(tagged_run_metadata=tagged)]
    return [event_pb2.Event(graph_def=module_tree_graph(model).SerializeToString())]
