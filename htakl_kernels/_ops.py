"""The `htakl` operator library: every op schema, defined once, then the compiled kernels.

The schemas are defined here, before htakl_kernels._C is imported, so that the C++ files only
register implementations (TORCH_LIBRARY_IMPL) and the Triton ops reuse the very same schema
strings (torch.library.triton_op(..., schema=...)).
"""

from __future__ import annotations

import importlib

import torch

# hta_kl_fused: see htakl_kernels/hta_kl.py for the contract.
HTA_KL_SCHEMA = (
    "(Tensor student, Tensor teacher, float temperature, float delta, bool logit_mean, "
    "bool detach_weights, bool grad_student, bool grad_teacher) -> (Tensor, Tensor, Tensor)"
)

LIBRARY = torch.library.Library("htakl", "DEF")
LIBRARY.define("hta_kl_fused" + HTA_KL_SCHEMA)


def _load_extension():
    try:
        return importlib.import_module("htakl_kernels._C"), None
    except ImportError as error:  # not built: the reference (and Triton) still work
        return None, error


EXTENSION, EXTENSION_ERROR = _load_extension()
