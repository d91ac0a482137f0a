"""How a vapo op is defined: its arguments once, as a NamedTuple; a schema, a fake kernel
and autograd from it; and a call that skips the dispatcher in plain eager mode.

``torch.library.custom_op`` gives each op a schema that ``torch.compile``, ``torch.export``
and ``opcheck`` understand - but calling it through the dispatcher costs 30-60 us of
Python per call (more with autograd: ``fill_defaults`` alone is ~100 us for a 20-argument
op), which at the micro-batch sizes a trainer uses is more than the kernel. So
:meth:`Op.__call__` runs the op's own implementation directly (with an equivalent
``torch.autograd.Function`` when a gradient is needed) whenever nothing traces the call,
and goes through ``torch.ops.vapo.<name>`` otherwise (under ``torch.compile``, a fake or
functional tensor mode, functorch transforms, or tensor subclasses). Both paths run the
same Python and kernels, so their results are identical (tested).

Op implementations, fakes, ``setup_context`` and ``backward`` receive the arguments as
the op's NamedTuple (``a.logits``, ``a.need_grad``) - never as positional indices.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode

_SCHEMA_TYPES = {
    Tensor: "Tensor",
    float: "float",
    int: "int",
    bool: "bool",
    str: "str",
    Sequence[float]: "float[]",
}


def _schema_type(annotation) -> str:
    if annotation in _SCHEMA_TYPES:
        return _SCHEMA_TYPES[annotation]
    args = typing.get_args(annotation)
    if len(args) == 2 and type(None) in args:  # X | None
        inner = args[0] if args[1] is type(None) else args[1]
        return _SCHEMA_TYPES[inner] + "?"
    raise TypeError(f"no schema type for {annotation!r}")


def schema(args: type[NamedTuple], returns: str, mutates: Sequence[str] = ()) -> str:
    """``(Tensor logits, float temperature, ...) -> returns`` from the NamedTuple's hints."""
    hints = typing.get_type_hints(args)
    parts = []
    for name in args._fields:
        kind = _schema_type(hints[name])
        if name in mutates:
            kind = kind.replace("Tensor", f"Tensor({name}!)", 1)
        parts.append(f"{kind} {name}")
    return f"({', '.join(parts)}) -> {returns}"


def _tracing() -> bool:
    """A compiler, a dispatch mode (fake or functional tensors) or a functorch transform
    is active: the per-call checks that do not look at the arguments."""
    return (
        torch.compiler.is_compiling()
        or _get_current_dispatch_mode() is not None
        or torch._C._functorch.peek_interpreter_stack() is not None
    )


def no_values(*tensors) -> bool:
    """The wrappers' data checks must not run: something traces the call (see
    :func:`_tracing`), or an input is a ``meta`` tensor (shapes only; the op then runs
    its fake kernel). The ops check the values inside themselves."""
    return _tracing() or any(isinstance(t, Tensor) and t.is_meta for t in tensors)


def _func_transform_kinds() -> list:
    """The kinds (``TransformType``) of the torch.func transforms active now; none outside
    torch.func, and none under a compiler or a tensor mode (those trace the op instead)."""
    if (torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is None
            or _get_current_dispatch_mode() is not None):
        return []
    return [i.key() for i in torch._functorch.pyfunctorch.retrieve_all_functorch_interpreters()]


_GRAD, _JVP = torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp


FORWARD_MODE = ("vapo ops have reverse-mode gradients only (torch.func.grad, vjp, jacrev, "
                ".backward()); forward mode (jvp, jacfwd, hessian) is not supported")


def _tracked_by_outer_transform(t) -> bool:
    """``t`` (seen in a backward run by a torch.func transform) carries, under the wrapper
    of the transform running this backward, a gradient-tracking wrapper of another one."""
    functorch = torch._C._functorch
    if not isinstance(t, Tensor) or not functorch.is_functorch_wrapped_tensor(t):
        return False
    t = functorch.get_unwrapped(t)  # the transform running this backward
    while isinstance(t, Tensor) and functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_gradtrackingtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def mark_outputs_constant(ctx, a, output) -> None:
    """``setup_context`` of ops whose outputs are constants of the batch (advantages,
    returns, whitened values: every peer computes them under no_grad), marked so rather
    than let autograd fail later."""
    ctx.mark_non_differentiable(*(output if isinstance(output, tuple) else (output,)))


def no_gradient(ctx, *grads):
    raise RuntimeError("vapo GAE and whitening outputs are not differentiable")


class Op:
    """``vapo::<name>``: defined from ``args`` (a NamedTuple class), ``impl`` and ``fake``
    (both called with an ``args`` instance), optionally ``setup_context(ctx, a, output)``
    and ``backward(ctx, *grads)`` (returning one gradient per field, by name: see
    :meth:`grads`)."""

    def __init__(
        self,
        name: str,
        args: type[NamedTuple],
        returns: str,
        impl: Callable,
        fake: Callable,
        *,
        mutates: Sequence[str] = (),
        setup_context: Callable | None = None,
        backward: Callable | None = None,
        gradient_outputs: Sequence[tuple[str, int]] = (),
    ):
        self.name, self.args, self.impl = name, args, impl
        # (input field, index of the output holding its gradient): ops whose kernels write
        # the gradients of a loss (output 0) in the forward pass. Their eager calls take
        # the C++ node (see _loss_node), which only scales those by the loss's gradient.
        self.gradient_outputs = tuple((args._fields.index(f), i) for f, i in gradient_outputs)
        # The fields that may hold tensors: the only ones __call__ has to look at.
        hints = typing.get_type_hints(args)
        self.tensor_fields = tuple(
            i for i, f in enumerate(args._fields) if _schema_type(hints[f]).startswith("Tensor")
        )
        self.mutates = tuple(args._fields.index(m) for m in mutates)
        self.op = torch.library.custom_op(
            f"vapo::{name}",
            lambda *a: impl(args(*a)),
            mutates_args=tuple(mutates),
            schema=schema(args, returns, mutates),
        )
        self.op.register_fake(lambda *a: fake(args(*a)))
        self.function = self.grad_transform_function = None
        # GAE and whitening have a backward only to say their outputs are constants.
        self.differentiable = backward is not None and backward is not no_gradient
        if backward is not None:
            self.op.register_autograd(
                backward, setup_context=lambda ctx, inputs, output: setup_context(
                    ctx, args(*inputs), output
                )
            )
            self.function = _autograd_function(name, args, impl, setup_context, backward)
            self.grad_transform_function = _grad_transform_function(
                name, args, impl, setup_context, backward)

    def __call__(self, a: NamedTuple):
        """Run the op on ``a`` (an instance of its args class)."""
        # One look at each tensor argument decides both questions (a tensor subclass
        # means tracing; requires_grad means autograd): this runs on every op call.
        wants_grad = False
        for i in self.tensor_fields:
            t = a[i]
            if t is None:  # most optional inputs, most calls: the cheapest test first
                continue
            if type(t) is Tensor and not t.is_meta:
                wants_grad = wants_grad or t.requires_grad
            elif isinstance(t, Tensor):  # a subclass (fake, functional, DTensor...) or meta
                return getattr(torch.ops.vapo, self.name)(*a)
            # anything else (a wrong type the op's checks will name) passes
        if (self.grad_transform_function is not None
                and torch._C._functorch.peek_interpreter_stack() is not None):  # cheap first
            # Under torch.func gradient transforms only (grad, vjp, jacrev) the op runs as an
            # autograd.Function in the style functorch takes: the dispatcher's autograd for
            # a custom op refuses functorch. Forward mode (jvp, jacfwd, hessian) would get a
            # zero tangent from the dispatcher; vmap alone takes its per-sample fallback.
            # (A list, not a set: torch 2.11's compiler cannot hash the kinds.)
            kinds = _func_transform_kinds()
            if kinds and all(k == _GRAD for k in kinds):
                return self.grad_transform_function.apply(*a)
            if _JVP in kinds and self.differentiable:
                raise RuntimeError(FORWARD_MODE)
        if self.differentiable and forward_ad._current_level >= 0 and any(
                isinstance(t, Tensor) and forward_ad.unpack_dual(t).tangent is not None
                for t in a):  # dual tensors of torch.autograd.forward_ad: likewise
            raise RuntimeError(FORWARD_MODE)
        if _tracing():
            return getattr(torch.ops.vapo, self.name)(*a)
        return self.eager(a, wants_grad, self.impl)

    def eager(self, a: NamedTuple, wants_grad: bool, impl: Callable):
        """The op's eager call once its arguments are vetted (plain ``torch.Tensor``s,
        nothing tracing or transforming the call; ``wants_grad``: one of them requires
        grad): ``impl(a)``, made differentiable where a gradient is wanted. ``impl`` is
        the op's implementation, or the part of it that an op's own vetting selected."""
        if wants_grad and torch.is_grad_enabled():
            if self.gradient_outputs and (node := _loss_node()) is not None:
                return self._call_with_loss_node(a, node, impl)
            if self.function is not None:
                return self.function.apply(*a)
        out = impl(a)
        for i in self.mutates:  # what the dispatcher does for a mutating op
            torch.autograd.graph.increment_version(a[i])
        return out

    def _call_with_loss_node(self, a: NamedTuple, node, impl: Callable):
        # Loops, not comprehensions: each comprehension is a function call (Python 3.11),
        # and this runs on every loss call.
        inputs, outputs = [], []
        for field, output in self.gradient_outputs:
            t = a[field]
            if t is not None and t.requires_grad:
                inputs.append(t)
                outputs.append(output)
        if not inputs:  # only inputs without a gradient require grad: as the Function does
            return self.function.apply(*a)
        # The kernels' own gradients are the backward: no graph here. (The guard itself,
        # not torch.no_grad(): that context manager costs ~4 us per call.)
        torch._C._set_grad_enabled(False)
        try:
            out = impl(a)
        finally:
            torch._C._set_grad_enabled(True)  # only reached with grad mode on
        grads = []
        for i in outputs:
            grads.append(out[i])
        return (node(out[0], inputs, grads, self.name, False), *out[1:])

    def grads(self, **by_name) -> tuple:
        """A backward's return value: the named gradients, None for every other field."""
        out = [None] * len(self.args._fields)
        for name, g in by_name.items():
            out[self.args._fields.index(name)] = g
        return tuple(out)


_node = None
_node_tried = False


def _loss_node():
    """``loss_from_gradients`` of the C++ extension (csrc/loss_node.cpp), or None when the
    extension cannot be built: then a Python autograd.Function does the same (~50 us more
    per forward + backward, and it scales the gradients into a new tensor)."""
    global _node, _node_tried
    if not _node_tried:
        _node_tried = True
        from . import _backends

        ext = _backends.extension()
        _node = getattr(ext, "loss_from_gradients", None) if ext is not None else None
    return _node


def loss_from_gradients(loss: Tensor, inputs: Sequence[Tensor], grads: Sequence[Tensor],
                        name: str, donated: bool = False) -> Tensor:
    """``loss`` (computed without a graph) made differentiable in ``inputs``, whose
    gradients ``grads`` (d loss / d input, in the input's shape) its kernel already wrote:
    the backward only scales them by the loss's gradient - in place on the graph's last
    backward where nobody else holds them or their owner ``donated`` them (the logits of
    ``inplace_backward``). Works with retain_graph; a double backward through it raises."""
    node = _loss_node()
    if node is not None and not _tracing():
        return node(loss, list(inputs), list(grads), name, donated)
    # detach: an input and its own gradient buffer (inplace_backward) are one tensor, which
    # dynamo refuses as two arguments of a Function.
    return _LossFromGradients.apply(loss, len(inputs), *inputs, *(g.detach() for g in grads))


def first_order(backward: Callable) -> Callable:
    """For a backward whose gradients come from kernels (no graph of their own): under
    ``create_graph=True`` they come back as outputs of a node that raises when reached and
    has edges to the op's saved differentiable inputs, so anything that differentiates
    them again raises rather than let a second-order term go missing. (torch's
    ``once_differentiable`` leaves them constants when the incoming gradient has no
    graph, and its error node leads to no input.) The op's Function must save its
    differentiable inputs."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        kinds = _func_transform_kinds()
        if kinds:
            # torch.func.grad runs every backward with a graph; a second gradient transform
            # around it would differentiate this backward: refused at once. (A vjp_fn or
            # jacrev's backward runs after its own level has ended, so the stack alone does
            # not show the outer transform: its inputs and gradients do.)
            if kinds.count(_GRAD) > 1 or any(
                    _tracked_by_outer_transform(t) for t in (*ctx.saved_tensors, *grads)):
                raise RuntimeError(DOUBLE_BACKWARD)
            with torch.no_grad():
                return backward(ctx, *grads)
        with torch.no_grad():
            out = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return out
        outs = out if isinstance(out, tuple) else (out,)
        inputs = [t for t in ctx.saved_tensors if isinstance(t, Tensor) and t.requires_grad]
        inputs += [g for g in grads if isinstance(g, Tensor) and g.requires_grad]
        error = torch._C._functions.DelayedError(DOUBLE_BACKWARD.encode(), len(outs) + len(inputs))
        wrapped = error(*[t.detach().requires_grad_() if isinstance(t, Tensor) else t
                          for t in outs], *inputs)[:len(outs)]
        return wrapped if isinstance(out, tuple) else wrapped[0]

    return wrapper


DOUBLE_BACKWARD = "vapo: this gradient is not differentiable (no double backward through it)"


class _LossFromGradients(torch.autograd.Function):
    """The Python twin of the C++ node (no extension, or under torch.compile or
    torch.func.grad: hence the separate setup_context, which functorch requires)."""

    @staticmethod
    def forward(loss, n, *tensors):
        return loss.detach()  # a new tensor, not a view of an input: takes in-place ops

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, n, *tensors = inputs
        ctx.n = n
        ctx.dtypes = [t.dtype for t in tensors[:n]]
        ctx.save_for_backward(*tensors[n:], *tensors[:n])  # inputs: for first_order

    @staticmethod
    @first_order
    def backward(ctx, grad_loss):
        n = ctx.n
        out = [
            (g * grad_loss.to(g.dtype)).to(dtype) if need else None
            for g, dtype, need in zip(ctx.saved_tensors[:n], ctx.dtypes, ctx.needs_input_grad[2:])
        ]
        return None, None, *out, *([None] * n)


def _autograd_function(name, args, impl, setup_context, backward) -> type:
    """The eager twin of the dispatcher's autograd for the op: same setup and backward.
    (``forward`` takes ``ctx`` itself: the separate-``setup_context`` style of
    ``autograd.Function`` costs ~30 us more per call.)"""

    def forward(ctx, *a):
        a = args(*a)
        output = impl(a)
        setup_context(ctx, a, output)
        return output

    return type(
        f"{name}_function",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )


def _grad_transform_function(name, args, impl, setup_context, backward) -> type:
    """The op's autograd.Function for torch.func's gradient transforms: forward and
    setup_context apart, as functorch requires (~30 us more per call than the eager twin,
    so only there)."""

    def setup(ctx, inputs, output):
        setup_context(ctx, args(*inputs), output)

    return type(
        f"{name}_grad_transform_function",
        (torch.autograd.Function,),
        {"forward": staticmethod(lambda *a: impl(args(*a))), "setup_context": staticmethod(setup),
         "backward": staticmethod(backward)},
    )
