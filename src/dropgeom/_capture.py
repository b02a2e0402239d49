r"""What the layer rules consume: layer inputs and back-propagated factor columns (theory.md section 2).

:func:`rule_layers` picks the modules a :class:`~dropgeom.layer_rules.LayerRule`
covers; :func:`capture` records their inputs ``a`` and the columns ``g`` of the
factor ``S`` back-propagated to their outputs, from one forward and one backward
pass per column (:func:`capture_columns`: one column at a time; Dangel et al. 2020's recipe; forward hooks, because no
``torch.func`` primitive exposes layer outputs). With
``F = (1/n) sum_i J_i^T S_i S_i^T J_i``, the layer's part of ``J_i^T S_i`` is
then ``sum_t g_irt a_it^T`` per column ``r``.

Example:
    >>> import torch
    >>> from dropgeom import ModelManifold
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> m = ModelManifold(net, torch.randn(5, 3))
    >>> layers = rule_layers(m)
    >>> sorted(layers)
    ['0', '2']
    >>> a, g = capture(m, layers, torch.randn(5, 2, 2))["0"]
    >>> tuple(a.shape), tuple(g.shape)  # [n, T, d_in], [R, n, T, d_out]
    ((5, 1, 3), (2, 5, 1, 4))
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, NamedTuple, Optional, Set, Tuple

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from .layer_rules import LayerRule, layer_rule
from .manifold import ModelManifold

__all__ = ["RuleLayer", "rule_layers", "capture", "capture_columns", "pname"]

Records = Dict[str, Optional[Tuple[Tensor, Tensor]]]  # layer -> (input, output), None where not recorded


class Output(NamedTuple):
    """A layer's recorded output without its values: where its gradient enters the graph (``None`` for the model's
    output, whose columns are those of ``S``), its shape, dtype and device.

    Back-propagating to a :class:`~torch.autograd.graph.GradientEdge` instead of the output tensor lets the tensor
    go once the forward is done (unless the graph saves it): a convolution's output is as large as its activation
    (50 MiB for 16 channels of 28x28 over 1,000 images), and a Linear layer's is one more ``[n, d_out]``."""

    edge: Optional[GradientEdge]
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    @property
    def is_eta(self) -> bool:
        return self.edge is None


def _output(out: Tensor, eta: Tensor) -> Output:
    return Output(None if out is eta else get_gradient_edge(out), out.shape, out.dtype, out.device)


class RuleLayer(NamedTuple):
    """A module the fast paths take, with its rule."""

    module: nn.Module
    rule: LayerRule


def pname(module: str, leaf: str) -> str:
    """Full parameter name; the root module (``""``, e.g. a bare ``nn.Linear``) has no prefix."""
    return f"{module}.{leaf}" if module else leaf


def rule_layers(manifold: ModelManifold) -> Dict[str, RuleLayer]:
    """Modules with a layer rule whose weight (and bias, if any) are all free
    parameters held by no other module (tied weights take the generic path).

    A manifold with a custom ``forward`` takes the generic path: such a
    forward may transform parameters before a layer sees them (a
    reparametrisation) or call a layer several times (a mixture over masks),
    and the layer rules would then differentiate with respect to the wrong
    quantity.
    """
    if manifold.model is None or manifold._forward is not None:
        return {}
    free = set(manifold.param_names)
    holders: Dict[int, int] = {}  # parameter -> number of modules holding it (weight tying)
    for mod in manifold.model.modules():
        for p in mod._parameters.values():
            if p is not None:
                holders[id(p)] = holders.get(id(p), 0) + 1
    out = {}
    for name, mod in manifold.model.named_modules():
        rule = layer_rule(mod)
        if rule is not None and all(holders[id(p)] == 1 for p in mod.parameters(recurse=False)):
            keys = [pname(name, "weight")] + ([pname(name, "bias")] if rule.has_bias(mod) else [])
            if all(k in free for k in keys):
                out[name] = RuleLayer(mod, rule)
    return out


def _record(manifold: ModelManifold, layers: Dict[str, RuleLayer], copy: bool) -> Tuple[Tensor, Records, bool]:
    """One forward with hooks: ``(eta, {name: (input, output)}, stale)``.

    ``copy=False`` records the layer's own input and output tensors. If the model
    later modifies one of them in place (``ReLU(inplace=True)``, ``+=``), the records
    are stale (``stale=True``): run again handing the network copies (``copy=True``).
    A layer records ``None`` (the generic path takes its parameters) when it is called twice, when its rule does
    not accept its input, when the input's leading axis is not the sample axis (:func:`_sample_axis_first`), or
    when the forward uses its weight or bias outside the layer's own call (:func:`_used_elsewhere`).
    """
    names = {layer.module: name for name, layer in layers.items()}
    records: Records = {}
    versions: Dict[str, Tuple[int, int]] = {}
    inside: Dict[str, Set[Any]] = {}
    one_sample = _one_sample_inputs(manifold, layers)

    def hook(mod: nn.Module, inp: Tuple[Tensor, ...], out: Tensor):
        name = names[mod]
        if (
            name in records
            or not isinstance(out, Tensor)
            or not inp
            or not layers[name].rule.accepts(mod, inp[0])
            or not _sample_axis_first(inp[0], manifold.n, one_sample, name)
        ):
            records[name] = None
            return None
        x = inp[0].detach()
        records[name] = (x.clone() if copy else x, out)
        versions[name] = (inp[0]._version, out._version)
        inside[name] = _module_nodes(out, inp[0])
        return out.clone() if copy else None

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        params = {k: v.detach().requires_grad_(True) for k, v in manifold.params.items()}
        with torch.enable_grad():
            eta = manifold.forward(params)
    finally:
        for h in handles:
            h.remove()
    for name in _used_elsewhere(eta, layers, params, inside):
        records[name] = None
    stale = not copy and any(rec is not None and (rec[0]._version, rec[1]._version) != versions[k] for k, rec in records.items())
    return eta, records, stale


def _one_sample_inputs(manifold: ModelManifold, layers: Dict[str, RuleLayer]) -> Optional[Dict[str, torch.Size]]:
    """The input shape of each rule layer in a forward of the first input alone (``None`` when ``n = 1``: nothing to
    compare). A layer whose input on one sample is not ``[1, ...]`` does not hold the sample axis first (a
    sequence-first ``[L, n, d]`` input with ``L = n``, a table of ``n`` rows that is no input at all). Kept on the
    manifold (shapes only: the same at other parameters and on a subset of the inputs); ``{}`` if that forward
    fails (every layer then takes the generic path)."""
    if manifold.n == 1:
        return None
    cache: Dict[str, torch.Size] = manifold.__dict__.setdefault("_one_sample_layer_inputs", {})
    if not all(name in cache for name in layers):
        shapes: Dict[str, torch.Size] = {}

        def hook(mod: nn.Module, inp: Tuple[Tensor, ...], out: Any) -> None:
            if inp and isinstance(inp[0], Tensor):
                shapes.setdefault(names[mod], inp[0].shape)

        names = {layer.module: name for name, layer in layers.items()}
        handles = [m.register_forward_hook(hook) for m in names]
        try:
            with torch.no_grad():
                manifold.forward(manifold.params, tuple(x[:1] for x in manifold.inputs))
        except Exception:  # noqa: BLE001 -- a model that cannot take one input: no layer is checked, all go generic
            return {}
        finally:
            for h in handles:
                h.remove()
        cache.update({name: shapes.get(name, torch.Size([])) for name in layers})
    return cache


def _sample_axis_first(x: Tensor, n: int, one_sample: Optional[Dict[str, torch.Size]], name: str) -> bool:
    """Whether the recorded input ``x`` of layer ``name`` is ``[n, ...]`` with one row per input: its shape on the
    first input alone (``one_sample``, :func:`_one_sample_inputs`) must be ``[1, *x.shape[1:]]``."""
    if x.dim() == 0 or x.shape[0] != n:
        return False
    if one_sample is None:
        return True
    shape = one_sample.get(name)
    return shape is not None and len(shape) == x.dim() and shape[0] == 1 and tuple(shape[1:]) == tuple(x.shape[1:])


def _module_nodes(out: Tensor, x: Tensor) -> Set[Any]:
    """The autograd nodes of one layer call: those reachable from its output ``out`` before its input ``x``."""
    stop = x.grad_fn
    nodes: Set[Any] = set()
    todo = [out.grad_fn] if out.grad_fn is not None else []
    while todo:
        node = todo.pop()
        if node in nodes or node is stop:
            continue
        nodes.add(node)
        todo.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return nodes


def _used_elsewhere(
    eta: Tensor, layers: Dict[str, RuleLayer], params: Dict[str, Tensor], inside: Dict[str, Set[Any]]
) -> Set[str]:
    """The recorded layers whose weight or bias ``eta`` also depends on outside the layer's own call.

    A rule sees only its layer's inputs and outputs; a weight that the forward also uses elsewhere (an autoencoder
    decoding with ``F.linear(h, enc.weight.T)``, an output layer's weight looked up as an embedding) has a
    gradient the rule would miss. Found by one walk over the graph of ``eta``: an edge into a parameter's gradient
    accumulator from a node that is not one of the layer's own (:func:`_module_nodes`)."""
    owner: Dict[Any, str] = {}
    for name in inside:
        mod, rule = layers[name]
        keys = [pname(name, "weight")] + ([pname(name, "bias")] if rule.has_bias(mod) else [])
        owner.update({get_gradient_edge(params[k]).node: name for k in keys if k in params})
    found: Set[str] = set()
    seen: Set[Any] = set()
    todo = [eta.grad_fn] if owner and eta.grad_fn is not None else []
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            user = owner.get(nxt)
            if user is not None and node not in inside[user]:
                found.add(user)
            todo.append(nxt)
    return found


def _column_grads(eta: Tensor, outputs: Dict[str, Output], S: Tensor) -> Iterator[Dict[str, Optional[Tensor]]]:
    """Column ``r`` of ``S`` back-propagated to each output (``[n, *output dims]``; ``None`` if unused), for each ``r``.

    One backward per column, gradients with respect to the layer outputs only (no weight gradients); faster than
    one batched backward (``is_grads_batched``, whose vmap loops over pooling and activation backwards: 2x on a
    CNN). An output that is ``eta`` itself needs no backward: its columns are those of ``S``."""
    R = S.shape[2]
    back = [k for k, out in outputs.items() if out.edge is not None]
    outs = [out.edge for out in outputs.values() if out.edge is not None]
    for r in range(R):
        grads: Dict[str, Optional[Tensor]] = {k: S[:, :, r] for k, out in outputs.items() if out.is_eta}
        if outs:
            # the scalar <eta, S_r> rather than grad_outputs=S_r: same gradients, but PyTorch checks a grad_outputs
            # tensor's shape with torch.fx's symbolic shapes, whose first use imports sympy (~0.3 s, ~50 MiB
            # resident, once per process); a library call should not cost that (docs/benchmarks.md, "Peak memory, measured again")
            grads.update(
                zip(back, torch.autograd.grad((eta * S[:, :, r]).sum(), outs, retain_graph=r < R - 1, allow_unused=True))
            )
        yield grads
        del grads  # one column alive at a time: a generator's locals otherwise hold it through the next backward


def _backpropagate(
    eta: Tensor, outputs: Dict[str, Output], S: Tensor, stacked: Dict[str, Optional[Tensor]]
) -> Iterator[Dict[str, Optional[Tensor]]]:
    """Column by column, the outputs not named in ``stacked``; once the columns are exhausted, ``stacked`` holds
    all columns of each output named there (``[R, n, *output dims]``; ``None`` if unused).

    Stacked columns are written into one buffer per output, sample-major (``[n, R, ...]`` in memory, returned as
    its ``[R, n, ...]`` view), so that a sample's columns are contiguous; an output that is ``eta`` itself is
    ``S`` (as ``[R, n, K]``)."""
    R = S.shape[2]
    bufs: Dict[str, Optional[Tensor]] = {k: None for k in stacked if not outputs[k].is_eta}
    r = -1
    for grads in _column_grads(eta, outputs, S):  # not enumerate(): its cached (r, grads) tuple keeps the last column
        r += 1
        for k, g in grads.items():
            if k in bufs and g is not None:
                buf = bufs[k]
                if buf is None:
                    buf = bufs[k] = g.new_empty((g.shape[0], R, *g.shape[1:]))
                buf[:, r] = g
        column = {k: g for k, g in grads.items() if k not in stacked}
        del grads  # (as in _column_grads: no reference to this column survives the next backward)
        g = None
        yield column
        del column
    stacked.update({k: S.permute(2, 0, 1) for k in stacked if outputs[k].is_eta})
    stacked.update({k: None if buf is None else buf.transpose(0, 1) for k, buf in bufs.items()})


def _recorded(manifold: ModelManifold, layers: Dict[str, RuleLayer]) -> Tuple[Tensor, Dict[str, Tuple[Tensor, Output]]]:
    """``eta`` and the recorded ``(input, output)`` of each layer called once with an accepted input (the output as
    an :class:`Output`: the output tensors themselves are not kept)."""
    eta, records, stale = _record(manifold, layers, copy=False)
    if stale:
        del records
        eta, records, _ = _record(manifold, layers, copy=True)
    return eta, {k: (v[0], _output(v[1], eta)) for k, v in records.items() if v is not None}


def capture(manifold: ModelManifold, layers: Dict[str, RuleLayer], S: Tensor) -> Dict[str, Tuple[Tensor, Tensor]]:
    """For each rule layer: its unfolded inputs ``a`` (``[n, T, d_in]``, :meth:`LayerRule.unfold`)
    and the back-propagated columns ``g`` (``[R, n, T, d_out]``, :meth:`LayerRule.columns`)
    of ``S`` at its outputs. Layers called more than once per forward (weight tying)
    are left out (the generic per-sample path takes them).
    """
    eta, good = _recorded(manifold, layers)
    grads: Dict[str, Optional[Tensor]] = {k: None for k in good}
    for _ in _backpropagate(eta, {k: out for k, (_, out) in good.items()}, S, grads):
        pass
    R = S.shape[2]
    result = {}
    for name, (x, out) in good.items():
        mod, rule = layers[name]
        a = rule.unfold(mod, x)
        g = grads[name]
        if g is None:
            g = torch.zeros((R, *out.shape), dtype=out.dtype, device=out.device)
        result[name] = (a, rule.columns(mod, g.detach()))
    return result


def capture_columns(
    manifold: ModelManifold,
    layers: Dict[str, RuleLayer],
    S: Tensor,
    stack: Callable[[str, Tensor, bool], bool] = lambda name, a, is_eta: False,
) -> Tuple[Dict[str, Tensor], Iterator[Dict[str, Tensor]], Dict[str, Tensor]]:
    """:func:`capture` one column at a time: the unfolded inputs ``a`` of each rule layer; an iterator over the
    columns ``r`` of ``S`` giving each layer's ``g`` for that column alone (``[1, n, T, d_out]``); and, filled once
    the iterator is exhausted, all columns (``[R, n, T, d_out]``, as :func:`capture`) of the layers that
    ``stack(name, a, is_eta)`` selects by name, unfolded input and whether the layer's output is the model's output
    (whose columns are those of ``S``: stacked at no cost) (left out of the iterator).

    For quantities that are sums over the columns (the gradient factor ``B`` of KFAC, per-sample gradients): only
    one column's back-propagated outputs are alive at a time, and none is copied into a stack.
    """
    eta, good = _recorded(manifold, layers)
    inputs = {name: layers[name].rule.unfold(layers[name].module, x) for name, (x, _) in good.items()}
    outputs = {k: out for k, (_, out) in good.items()}
    stacked: Dict[str, Optional[Tensor]] = {k: None for k, a in inputs.items() if stack(k, a, outputs[k].is_eta)}
    result: Dict[str, Tensor] = {}

    def g_of(name: str, g: Optional[Tensor], R: int) -> Tensor:
        mod, rule = layers[name]
        g = torch.zeros((R, *outputs[name].shape), dtype=S.dtype, device=S.device) if g is None else g.detach()
        return rule.columns(mod, g)

    def columns() -> Iterator[Dict[str, Tensor]]:
        for grads in _backpropagate(eta, outputs, S, stacked):
            column = {name: g_of(name, None if g is None else g.unsqueeze(0), 1) for name, g in grads.items()}
            del grads  # one column alive at a time (consumers drop theirs too: see _fisher_structures)
            yield column
            del column
        result.update({name: g_of(name, g, S.shape[2]) for name, g in stacked.items()})

    return inputs, columns(), result
