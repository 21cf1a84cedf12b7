"""The rule registries and the public :func:`register_rule` API.

A rule tells the converter how one op acts on masked activations. It is looked up by
the op's module class (through the class hierarchy), function object, or method name.

``run(ctx, target, args, kwargs)`` is called instead of the op whenever at least one
argument is a :class:`~masktrain.layer_masking.masked.Masked` (ops on plain tensors,
e.g. the head after global pooling, run unchanged). ``target`` is the module instance,
the function, or the method name. It returns a ``Masked`` (the output is still a map)
or a plain tensor (the mask was consumed, e.g. a global pool).

``static(node, target)`` is consulted once at conversion: it returns whether the op's
output is still masked, or raises :class:`~masktrain.errors.UserError` for an
unsupported use. ``None`` means "output stays masked".

``layouts``: whether ``run`` accepts maps whose axes are not ``(B, C, H, W)`` (see
``Masked.layout``); rules that read spatial structure (convolution, pooling) leave it
``False`` and the converter refuses permuted maps for them with a clear error.

Writing a rule is described in ``docs/layer_masking.md`` ("Writing a rule").
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

from torch import fx, nn

from masktrain.errors import UserError


class Ctx:
    """Per-forward state handed to rules: the mask cache and where in the model we are (for errors)."""

    def __init__(self) -> None:
        from masktrain.layer_masking.masked import MaskCache

        self.cache = MaskCache()
        self.where = ""
        self.node: Optional[fx.Node] = None  # the graph node being run
        # positional arguments of the current op whose tensors nothing else reads (set per step
        # by the converter from the graph): the rule may write its result into them
        self.overwritable: Tuple[int, ...] = ()
        # ... and those whose tensors nothing else reads nor, without autograd, saves (a conv /
        # BN output, possibly through activations): the rule may write into them under no_grad
        self.owned_no_grad: Tuple[int, ...] = ()

    def fail(self, op: str, reason: str) -> UserError:
        return UserError(f"layer masking does not support {op} at {self.where}: {reason}")


Run = Callable[[Ctx, Any, tuple, dict], Any]
Static = Callable[[fx.Node, Any], bool]


@dataclass(frozen=True)
class Rule:
    run: Run
    static: Optional[Static] = None  # None: output stays masked
    layouts: bool = False  # run accepts permuted / channel-reshaped maps (Masked.layout)


MODULE_RULES: Dict[type, Rule] = {}
FUNCTION_RULES: Dict[Callable, Rule] = {}
METHOD_RULES: Dict[str, Rule] = {}


def _table(target: Any) -> Tuple[dict, str]:
    if isinstance(target, str):
        return METHOD_RULES, f"method .{target}()"
    if isinstance(target, type):
        if not issubclass(target, nn.Module):
            raise UserError(f"register_rule: {target!r} is a class but not an nn.Module subclass")
        return MODULE_RULES, f"module {target.__module__}.{target.__qualname__}"
    if callable(target):
        return FUNCTION_RULES, f"function {getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', target)}"
    raise UserError(f"register_rule: target must be an nn.Module class, a function or a method name; got {target!r}")


def register_rule(
    target: Union[type, Callable, str, Sequence[Union[type, Callable, str]]],
    run: Run,
    static: Optional[Static] = None,
    *,
    layouts: bool = False,
) -> None:
    """Register (or replace, with a warning) the layer-masking rule for ``target``.

    ``target``: an ``nn.Module`` subclass (modules with a rule are kept as leaves of the
    trace, so their ``forward`` need not be traceable; subclasses that do not override
    ``forward`` inherit the rule), a function (``torch.nn.functional.pad``), a method
    name (``"permute"``), or a list of them. ``run``, ``static`` and ``layouts`` as in
    :class:`Rule` (see the module docstring and ``docs/layer_masking.md``).

    Example::

        from masktrain.layer_masking import Masked, clean, register_rule

        def my_block_rule(ctx, block, args, kwargs):
            x = clean(args[0])                   # zero the removed positions before reading across them
            return Masked(block(x.a) * x.m, x.m)

        register_rule(MyBlock, my_block_rule)

    Rules apply to models converted after the call.
    """
    targets = list(target) if isinstance(target, (list, tuple)) else [target]
    for t in targets:
        table, name = _table(t)
        if t in table:
            warnings.warn(f"layer masking: replacing the rule for {name}", UserWarning, stacklevel=2)
        table[t] = Rule(run, static, layouts)


def register_builtin(table: dict, keys: Sequence, run: Run, static: Optional[Static] = None, layouts: bool = False) -> None:
    """masktrain's own rules (no replacement warning: a later built-in rule may refine an earlier one)."""
    for key in keys:
        table[key] = Rule(run, static, layouts)


def module_rule(kind: type) -> Optional[Rule]:
    """The rule for module class ``kind``: its own, or that of the nearest registered base class
    whose ``forward`` it inherits (a subclass that overrides ``forward`` computes something else,
    so it is traced through instead, or needs a rule of its own)."""
    rule = MODULE_RULES.get(kind)
    if rule is not None:
        return rule
    for base in kind.__mro__[1:]:
        rule = MODULE_RULES.get(base)
        if rule is not None:
            return rule if getattr(kind, "forward", None) is getattr(base, "forward", None) else None
    return None
