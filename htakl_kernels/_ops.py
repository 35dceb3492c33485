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
    "bool detach_weights, bool grad_student, bool grad_teacher, float row_scale=1.0) "
    "-> (Tensor, Tensor, Tensor)"
)

# lif_forward / lif_backward: see htakl_kernels/lif.py for the contract.
LIF_FORWARD_SCHEMA = (
    "(Tensor x, Tensor v_init, float tau, float v_threshold, float v_reset, bool soft_reset, "
    "bool decay_input, bool detach_reset, str surrogate, float alpha, bool return_v_seq) "
    "-> (Tensor, Tensor, Tensor)"
)
LIF_BACKWARD_SCHEMA = (
    "(Tensor grad_spikes, Tensor grad_v_last, Tensor grad_v_seq, Tensor x, Tensor v_init, "
    "float tau, float v_threshold, float v_reset, bool soft_reset, bool decay_input, "
    "bool detach_reset, str surrogate, float alpha) -> (Tensor, Tensor)"
)

LIBRARY = torch.library.Library("htakl", "DEF")
LIBRARY.define("hta_kl_fused" + HTA_KL_SCHEMA)
LIBRARY.define("lif_forward" + LIF_FORWARD_SCHEMA)
LIBRARY.define("lif_backward" + LIF_BACKWARD_SCHEMA)


def _load_extension():
    try:
        return importlib.import_module("htakl_kernels._C"), None
    except ImportError as error:  # not built: the reference (and Triton) still work
        return None, error


EXTENSION, EXTENSION_ERROR = _load_extension()
