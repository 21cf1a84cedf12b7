"""Convert any traceable CNN to layer masking from its torch.fx graph, without touching its code.

:func:`layer_mask` traces the model once (modules that have a rule are kept as leaves),
checks every op that can see a masked activation against the rule registries in
:mod:`masktrain.layer_masking.ops` (raising one :class:`UserError` naming the op and the
module path for anything unsupported), and returns a :class:`LayerMasked` that runs
the graph with ``(activations, mask)`` pairs.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, fx, nn

from masktrain.errors import UserError
from masktrain.layer_masking.masked import Masked
from masktrain.layer_masking import norm_ops, resample_ops, shape_ops  # noqa: F401  (they register their rules)
from masktrain.layer_masking.ops import ELEMENTWISE_MODULE_RUNS as _ELEMENTWISE_RUNS, describe_missing
from masktrain.layer_masking.registry import FUNCTION_RULES, METHOD_RULES, Ctx, Rule, module_rule


# timm notrace modules that torch.fx does trace, and that the converter runs correctly: NFNet's
# block is excluded by timm because an unused in-place ``out.mul_(gain)`` node would be dropped by
# FX code generation; the converter runs every node, and in-place methods update their operand.
_TRACE_THROUGH = ("timm.models.nfnet.NormFreeBlock",)


def _notrace_modules() -> tuple:
    try:
        from timm.layers import get_notrace_modules

        return tuple(m for m in get_notrace_modules() if f"{m.__module__}.{m.__qualname__}" not in _TRACE_THROUGH)
    except ImportError:  # pragma: no cover
        return ()


def _autowrap_functions() -> tuple:
    try:
        from timm.layers import get_notrace_functions

        return tuple(f for f in get_notrace_functions() if callable(f))
    except ImportError:  # pragma: no cover
        return ()


class _Tracer(fx.Tracer):
    """Keeps modules with a rule (and timm's untraceable ones) as leaves; traces through the rest."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=_autowrap_functions())
        self._notrace = _notrace_modules()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if module_rule(type(m)) is not None or isinstance(m, self._notrace):
            return True
        # Built-in torch modules without a rule (Linear, Flatten, ...) are leaves too; they run
        # on plain tensors and are refused on masked ones.
        return type(m).__module__.startswith("torch.nn") and not isinstance(
            m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)
        )


def _where(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module '{node.target}'"
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()), None) if stack else None
    path = path[0] if isinstance(path, tuple) else path
    return f"'{node.name}' in module '{path}'" if path else f"'{node.name}'"


def _op_name(node: fx.Node, target: Any) -> str:
    if node.op == "call_module":
        return type(target).__name__
    if node.op == "call_method":
        return f"method .{node.target}()"
    return getattr(node.target, "__name__", str(node.target))


def _input_nodes(node: fx.Node) -> List[fx.Node]:
    found: List[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


class _Step:
    """One graph node resolved at conversion: how to call it, and with which rule if masked."""

    __slots__ = ("node", "kind", "target", "rule", "where", "free", "overwritable", "owned_no_grad")

    def __init__(self, node: fx.Node, kind: str, target: Any, rule: Optional[Rule], where: str) -> None:
        self.node, self.kind, self.target, self.rule, self.where = node, kind, target, rule, where
        self.free: List[fx.Node] = []  # values no later step reads
        self.overwritable: Tuple[int, ...] = ()  # positional args the rule may modify in place
        self.owned_no_grad: Tuple[int, ...] = ()  # ... and those it may modify in place under no_grad


def _resolve(node: fx.Node, modules: Dict[str, nn.Module]) -> Tuple[Any, Optional[Rule]]:
    if node.op == "call_module":
        target = modules[node.target]
        return target, module_rule(type(target))
    if node.op == "call_method":
        return node.target, METHOD_RULES.get(node.target)
    return node.target, FUNCTION_RULES.get(node.target)


class LayerMasked(nn.Module):
    """``forward(x, keep)``: the wrapped model with the keep mask applied to every activation map.

    ``x`` ``(B, 3, H, W)`` normalised input, ``keep`` ``(B, 1, H, W)`` in {0, 1}. Returns what
    ``model(x)`` returns. The model is held as the submodule ``model``: parameters and
    buffers are its own, and ``train()``/``eval()`` on either object act on the same
    modules (rules read each submodule's ``training`` flag at call time).

    Python branches on ``self.training`` inside traced code (timm heads'
    ``F.dropout(x, p, training=self.training)``) are frozen by torch.fx at trace time, so
    the model is traced twice, in training and in evaluation mode (as torchvision's
    ``create_feature_extractor`` does), and each forward runs the graph of the model's
    current mode (``model.training``).
    """

    def __init__(self, model: nn.Module, plans: Dict[bool, Tuple[fx.Graph, List[_Step]]]) -> None:
        super().__init__()
        self.model = model
        self._plans = plans
        self._outputs = {mode: next(n for n in g.nodes if n.op == "output") for mode, (g, _) in plans.items()}

    @property
    def _steps(self) -> List[_Step]:
        """The steps of the graph for the model's current mode."""
        return self._plans[bool(self.model.training)][1]

    @property
    def _graph(self) -> fx.Graph:
        return self._plans[bool(self.model.training)][0]

    @property
    def training(self) -> bool:  # type: ignore[override]
        # Mirrors the wrapped model, so model.train()/eval() is seen here as well as the reverse.
        model = self.__dict__.get("_modules", {}).get("model")
        return model.training if model is not None else self.__dict__.get("_training", True)

    @training.setter
    def training(self, mode: bool) -> None:
        self.__dict__["_training"] = mode  # train()/eval() then recurse into the model itself

    def _get_attr(self, target: str) -> Any:
        value: Any = self.model
        for part in target.split("."):
            value = getattr(value, part)  # looked up per call: .to() replaces parameter/buffer tensors
        return value

    def forward(self, x: Tensor, keep: Tensor) -> Any:
        if keep.dim() != 4 or keep.shape[1] != 1 or keep.shape[0] != x.shape[0] or keep.shape[2:] != x.shape[2:]:
            raise UserError(f"keep mask must have shape (B, 1, H, W) matching x {tuple(x.shape)}; got {tuple(keep.shape)}")
        keep = keep.to(dtype=x.dtype, device=x.device)
        ctx = Ctx()
        env: Dict[fx.Node, Any] = {}
        placeholders = iter([Masked(x * keep, keep)])
        load = lambda n: env[n]  # noqa: E731
        mode = bool(self.model.training)
        graph_steps, output = self._plans[mode][1], self._outputs[mode]
        for step in graph_steps:
            node = step.node
            if step.kind == "placeholder":
                env[node] = next(placeholders, node.args[0] if node.args else None)
            elif step.kind == "get_attr":
                env[node] = self._get_attr(node.target)
            else:
                args = fx.node.map_arg(node.args, load)
                kwargs = fx.node.map_arg(node.kwargs, load)
                env[node] = self._call(step, ctx, args, kwargs)
            for dead in step.free:
                del env[dead]
        result = fx.node.map_arg(output.args[0], load)
        return _unmask_output(result)

    @staticmethod
    def _call(step: _Step, ctx: Ctx, args: tuple, kwargs: dict) -> Any:
        if step.rule is not None and _any_masked(args, kwargs):
            ctx.where, ctx.overwritable, ctx.node = step.where, step.overwritable, step.node
            ctx.owned_no_grad = step.owned_no_grad
            if not step.rule.layouts:
                _require_nchw(ctx, step, args, kwargs)
            return step.rule.run(ctx, step.target, args, kwargs)
        if _any_masked(args, kwargs):  # an input whose maskedness was decided at run time (see _plan)
            ctx.where = step.where
            raise ctx.fail(_op_name(step.node, step.target), describe_missing(str(step.node.target)))
        if step.kind == "call_method":
            return getattr(args[0], step.target)(*args[1:], **kwargs)
        return step.target(*args, **kwargs)


def _require_nchw(ctx: Ctx, step: _Step, args: tuple, kwargs: dict) -> None:
    for v in list(args) + list(kwargs.values()):
        for u in v if isinstance(v, (list, tuple)) else (v,):
            if isinstance(u, Masked) and u.layout is not None:
                op = _op_name(step.node, step.target)
                raise ctx.fail(op, f"its rule needs a (B, C, H, W) map; this one has axes {u.layout} "
                                   f"(permuted or channel-reshaped)")


def _any_masked(args: tuple, kwargs: dict) -> bool:
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, Masked):
            return True
        if isinstance(v, (list, tuple)) and any(isinstance(u, Masked) for u in v):
            return True
    return False


def _unmask_output(value: Any) -> Any:
    if isinstance(value, Masked):
        raise UserError(
            "layer masking: the model returns a spatial activation map; layer masking needs a model whose "
            "output is pooled (e.g. logits or pooled features)"
        )
    if isinstance(value, (list, tuple)):
        return type(value)(_unmask_output(v) for v in value)
    return value


def _trace(model: nn.Module) -> fx.Graph:
    try:
        return _Tracer().trace(model)
    except Exception as exc:  # fx raises many types for untraceable control flow
        first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise UserError(
            f"layer masking could not trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {first}); "
            f"layer masking needs a model without data-dependent Python control flow"
        ) from exc


def _plan(model: nn.Module, graph: fx.Graph) -> List[_Step]:
    modules = dict(model.named_modules())
    for node in graph.nodes:
        if node.op == "call_module":
            node.meta["layer_masking_module"] = modules[node.target]  # for static checks that look at users
    # True: masked; False: plain; None: decided when the graph runs (a reduction whose axes depend
    # on a layout, e.g. a mean over (3, 4) of a channel-reshaped map): ops without a rule are then
    # refused at the first forward instead of at conversion, with the same message.
    masked: Dict[fx.Node, Optional[bool]] = {}
    steps: List[_Step] = []
    first_placeholder = True
    for node in graph.nodes:
        if node.op == "output":
            continue
        if node.op == "placeholder":
            masked[node] = first_placeholder
            first_placeholder = False
            steps.append(_Step(node, "placeholder", None, None, node.name))
            continue
        if node.op == "get_attr":
            masked[node] = False
            steps.append(_Step(node, "get_attr", node.target, None, node.name))
            continue
        target, rule = _resolve(node, modules)
        where = _where(node)
        states = [masked[n] for n in _input_nodes(node)]
        if not any(s is not False for s in states):
            masked[node] = False
        elif not any(s is True for s in states):
            masked[node] = None
        elif rule is None:
            op = _op_name(node, target)
            raise UserError(f"layer masking does not support {op} at {where}: {describe_missing(str(node.target))}")
        else:
            try:
                masked[node] = True if rule.static is None else rule.static(node, target)
            except UserError as exc:
                raise UserError(f"{exc} (at {where})") from None
        steps.append(_Step(node, node.op, target, rule, where))
    _mark_last_uses(graph, steps)
    _mark_overwritable(steps, modules)
    return steps


# Rules for these modules return a tensor they allocated and that nothing else references,
# and autograd does not save it (BN and conv save their inputs, the mask multiply saves the
# mask), so a single consumer may write into it.
_FRESH_OUTPUT_MODULES = (nn.Conv2d, nn.BatchNorm2d)


_PASS_THROUGH_MODULES = (nn.Identity, nn.Dropout)  # return their input (or, training, a fresh tensor)


def _sole_fresh(node: Any, modules: Dict[str, nn.Module]) -> bool:
    """Whether ``node``'s value is a fresh tensor read only by its single user."""
    if not isinstance(node, fx.Node) or len(node.users) != 1 or node.op != "call_module":
        return False
    module = modules[node.target]
    kind = type(module)
    if kind in _FRESH_OUTPUT_MODULES:
        return True
    if kind.__name__ == "BatchNormAct2d":  # timm: bn, then drop and act submodules
        return all(type(getattr(module, sub, None)) in _PASS_THROUGH_MODULES for sub in ("drop", "act"))
    return kind in _PASS_THROUGH_MODULES and len(node.args) == 1 and _sole_fresh(node.args[0], modules)


def _sole_fresh_no_grad(node: Any, modules: Dict[str, nn.Module]) -> bool:
    """Whether ``node``'s value is a fresh tensor read only by its single user, when no autograd
    graph is recorded (then nothing saves it for backward): a conv or batch norm output (timm's
    ``BatchNormAct2d`` with any activation), or an elementwise activation / identity module
    applied to such a value (in place or not, its output is then fresh as well)."""
    if not isinstance(node, fx.Node) or len(node.users) != 1 or node.op != "call_module":
        return False
    module = modules[node.target]
    if isinstance(module, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)):
        return True
    rule = module_rule(type(module))
    return (rule is not None and rule.run in _ELEMENTWISE_RUNS and len(node.args) == 1
            and _sole_fresh_no_grad(node.args[0], modules))


def _mark_overwritable(steps: List[_Step], modules: Dict[str, nn.Module]) -> None:
    for step in steps:
        if step.rule is not None:
            step.overwritable = tuple(i for i, arg in enumerate(step.node.args) if _sole_fresh(arg, modules))
            step.owned_no_grad = tuple(i for i, arg in enumerate(step.node.args) if _sole_fresh_no_grad(arg, modules))


def _mark_last_uses(graph: fx.Graph, steps: List[_Step]) -> None:
    # Free each value after its last reader so evaluation keeps no more alive than the model would.
    index = {s.node: i for i, s in enumerate(steps)}
    last: Dict[fx.Node, int] = {}
    for s in steps:
        for n in _input_nodes(s.node):
            last[n] = index[s.node]
    output = next(n for n in graph.nodes if n.op == "output")
    for n in _input_nodes(output):
        last.pop(n, None)
    for n, i in last.items():
        steps[i].free.append(n)


def layer_mask(model: nn.Module) -> LayerMasked:
    """Convert ``model`` (``model(x)`` with ``x`` ``(B, 3, H, W)``) to layer masking.

    Returns a module called as ``masked(x, keep)`` with ``keep`` ``(B, 1, H, W)`` in {0, 1}
    (1 = visible), returning what ``model(x)`` returns. Parameters and buffers are shared.
    Raises :class:`UserError` naming the op and module path if any op reached by a masked
    activation has no layer-masking rule (e.g. attention, flattening a spatial map) or if
    torch.fx cannot trace the model.
    """
    modes = {name: m.training for name, m in model.named_modules()}
    plans: Dict[bool, Tuple[fx.Graph, List[_Step]]] = {}
    try:
        for mode in (True, False):
            model.train(mode)
            graph = _trace(model)
            plans[mode] = (graph, _plan(model, graph))
    finally:
        for name, m in model.named_modules():  # restore each submodule's own flag (e.g. frozen BN)
            m.training = modes[name]
    return LayerMasked(model, plans)
