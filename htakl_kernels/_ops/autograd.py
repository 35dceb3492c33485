"""The ops' autograd formulas: registered with torch.library, and run in eager mode through an
autograd.Function of the same two functions.

torch.library's own autograd wrapper rebuilds the call's full argument list from the op's schema
on every call (to hand defaults to setup_context), which costs about 40 microseconds of host time
for an op of a dozen arguments: more than the whole kernel at small sizes, and the larger part of
a call whose GPU work is short. The public functions always pass every argument, so in eager
mode they call the op through `call`, whose autograd.Function runs the op below autograd and then
the very setup_context and backward that torch.library holds. The Function calls setup_context
from its forward (a Function that declares setup_context binds its arguments with
inspect.signature on every call, another 25 microseconds). Under torch.compile, functorch
transforms, or with gradients off, `call` is the op itself, so traced graphs keep the registered
op and its formula.
"""

from __future__ import annotations

import re

import torch

_EAGER_FUNCTIONS: dict = {}


def register_autograd(op, backward, setup_context) -> None:
    """torch.library.register_autograd(op, ...), and the eager autograd.Function `call` uses."""
    torch.library.register_autograd(op, backward, setup_context=setup_context)

    def forward(ctx, *args):
        # Straight to the device's kernel, as torch.library's own wrapper does (past its
        # autograd kernel, whose no-grad path would only redispatch: about 15 microseconds).
        with torch._C._AutoDispatchBelowAutograd():
            output = op(*args)
        setup_context(ctx, args, output)
        return output

    _EAGER_FUNCTIONS[op] = type(
        "Eager_" + re.sub(r"\W+", "_", getattr(op, "_name", None) or str(op)),
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )


def call(op, *args):
    """op(*args) with its registered autograd formula; every argument of the schema given."""
    function = _EAGER_FUNCTIONS.get(op)
    if (function is None or not torch.is_grad_enabled() or torch.compiler.is_compiling()
            or torch._C._are_functorch_transforms_active()):
        return op(*args)
    return function.apply(*args)
