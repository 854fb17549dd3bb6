"""In-place residual adds made out-of-place, so autograd and checkpointing can run a host's model.

Some host models add residuals in place: ComfyUI's Flux blocks do ``img += ...``, ``txt += ...``
and ``x += ...`` on their own inputs (Chroma and Flux.2 reuse those layers). For inference that
saves memory; for DNO it breaks the gradient twice over:

* a LayerNorm saved the residual for backward, then the block added to it in place: the backward
  pass refuses the changed tensor ("modified by an inplace operation");
* under block checkpointing, the block changed its own input, so the recompute in the backward
  pass starts from other values than the forward did.

The host's files stay as they are. While :func:`functional_residuals` is active, every method of
the given modules whose source has an augmented assignment to a plain name (``x += y``) runs a
version compiled from the host's own source with those statements as ``x = x + y``: the name is
rebound to a new tensor instead of the tensor being changed. Nothing else in the method changes
(same globals, defaults, line numbers for tracebacks), the result is the same, and the cost is one
allocation per rewritten statement, which the caching allocator serves. Calls on attributes or
subscripts (``a.b += y``, ``a[i] += y``) are left alone: they write into an object on purpose.
"""
from __future__ import annotations

import ast
import contextlib
import inspect
import logging
import operator
import sys
import textwrap
import types
from typing import Callable, Dict, Iterable, Iterator, List, Optional

import torch

log = logging.getLogger("DNO")

_REWRITTEN: Dict[Callable, Optional[Callable]] = {}   # original function -> rewrite (None: leave it)


_OPS = {ast.Add: (operator.add, operator.iadd), ast.Sub: (operator.sub, operator.isub),
        ast.Mult: (operator.mul, operator.imul), ast.Div: (operator.truediv, operator.itruediv)}
_HELPER = "_dno_out_of_place"
_NO_TYPE_PARAMS = {"type_params": []} if sys.version_info >= (3, 12) else {}


def out_of_place(op: str, target, value):
    """``target op= value`` for a tensor as ``target op value`` (a new tensor); anything else
    (a list, a number) keeps its own in-place meaning."""
    plain, inplace = _OPS[getattr(ast, op)]
    return plain(target, value) if isinstance(target, torch.Tensor) else inplace(target, value)


class _RebindAugmentedNames(ast.NodeTransformer):
    """``name op= value`` -> ``name = _dno_out_of_place("Op", name, value)`` for + - * /."""

    def __init__(self):
        self.count = 0

    def visit_AugAssign(self, node: ast.AugAssign):
        if not isinstance(node.target, ast.Name) or type(node.op) not in _OPS:
            return node
        self.count += 1
        call = ast.Call(func=ast.Name(id=_HELPER, ctx=ast.Load()),
                        args=[ast.Constant(type(node.op).__name__), ast.Name(id=node.target.id, ctx=ast.Load()),
                              node.value], keywords=[])
        return ast.copy_location(ast.Assign(targets=[node.target], value=call), node)

    def visit_FunctionDef(self, node):       # a nested function or class keeps its own semantics
        return node

    visit_AsyncFunctionDef = visit_Lambda = visit_ClassDef = visit_FunctionDef


def rewritten(function: Callable) -> Optional[Callable]:
    """``function`` with its augmented assignments to names made out-of-place for tensors, or None
    when it has none, or its source cannot be rebuilt faithfully (no source, a decorator, a
    closure)."""
    if function not in _REWRITTEN:
        _REWRITTEN[function] = _rewrite(function)
    return _REWRITTEN[function]


def _rewrite(function: Callable) -> Optional[Callable]:
    code = getattr(function, "__code__", None)
    if code is None or code.co_freevars or hasattr(function, "__wrapped__"):
        return None     # a closure (super(), a decorator's wrapper) cannot be rebuilt from source alone
    try:
        lines, first_line = inspect.getsourcelines(function)
    except (OSError, TypeError):
        return None
    tree = ast.parse(textwrap.dedent("".join(lines)))
    definition = tree.body[0] if tree.body else None
    if not isinstance(definition, ast.FunctionDef) or definition.decorator_list:
        return None
    transformer = _RebindAugmentedNames()
    definition.body = [transformer.visit(statement) for statement in definition.body]
    if transformer.count == 0:
        return None
    # def _outer(_dno_out_of_place): <the method>; return it -- the helper reaches the method as a
    # closure cell, so the host module's globals stay as they are
    outer = ast.FunctionDef(name="_outer", args=ast.arguments(posonlyargs=[], args=[ast.arg(arg=_HELPER)],
                                                              kwonlyargs=[], kw_defaults=[], defaults=[]),
                            body=[definition, ast.Return(ast.Name(id=definition.name, ctx=ast.Load()))],
                            decorator_list=[], returns=None, **_NO_TYPE_PARAMS)
    for node in (outer, outer.body[1]):
        ast.copy_location(node, definition)
    module = ast.Module(body=[outer], type_ignores=[])
    ast.increment_lineno(module, first_line - 1)
    ast.fix_missing_locations(module)
    namespace: dict = {}
    exec(compile(module, code.co_filename, "exec"), function.__globals__, namespace)
    new = namespace["_outer"](out_of_place)
    new.__defaults__ = function.__defaults__
    new.__kwdefaults__ = function.__kwdefaults__
    new.__qualname__ = function.__qualname__
    new.__module__ = function.__module__
    return new


def _methods(cls: type) -> Iterator[tuple]:
    """(name, function) of the methods a module class defines; torch's own classes (made to be
    differentiated) excluded."""
    seen = set()
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] == "torch" or klass is object:
            continue
        for name, value in vars(klass).items():
            if name not in seen and isinstance(value, types.FunctionType) and not name.startswith("__"):
                seen.add(name)
                yield name, value


def rewritten_methods(module: torch.nn.Module) -> List[tuple]:
    """(name, rewritten function) for each method of ``module`` that adds to a name in place."""
    out = []
    for name, function in _methods(type(module)):
        new = rewritten(function)
        if new is not None:
            out.append((name, new))
    return out


@contextlib.contextmanager
def functional_residuals(modules: Iterable[torch.nn.Module]) -> Iterator[int]:
    """While active, the modules run their methods with in-place name updates made out-of-place
    (bound on each instance; the class and the host's files are untouched). Restored on exit, on
    errors too. Yields how many methods were replaced. Enter it before block checkpointing, which
    wraps whatever ``forward`` the instance has then."""
    patched = []
    kinds = set()
    try:
        for module in modules:
            for name, function in rewritten_methods(module):
                patched.append((module, name, module.__dict__.get(name)))
                setattr(module, name, types.MethodType(function, module))
                kinds.add(f"{type(module).__name__}.{name}")
        if kinds:
            log.info("DNO: in-place residual adds made out-of-place for autograd in %s", ", ".join(sorted(kinds)))
        yield len(patched)
    finally:
        for module, name, own in reversed(patched):
            if own is None:
                delattr(module, name)
            else:
                setattr(module, name, own)
