"""The bottom layer: the `htakl` operator library (every op schema, defined once), the compiled
C++ extension, and the dtype rule every backend shares.

The schemas are defined here, before htakl_kernels._C is imported, so that the C++ files only
register implementations (TORCH_LIBRARY_IMPL) and the Triton ops reuse the very same schema
strings (torch.library.triton_op(..., schema=...)). Everything in the package may import this
module; it imports nothing of the package.
"""

from __future__ import annotations

import importlib

import torch

# hta_kl_fused: see htakl_kernels/_ops/hta_kl.py for the contract.
HTA_KL_SCHEMA = (
    "(Tensor student, Tensor teacher, float temperature, float delta, bool logit_mean, "
    "bool detach_weights, bool grad_student, bool grad_teacher, float row_scale=1.0) "
    "-> (Tensor, Tensor, Tensor)"
)

# lif_forward / lif_backward: see htakl_kernels/_ops/lif.py for the contract.
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

# The vocab-parallel HTA-KL's phases on one rank's slice of the classes: see
# htakl_kernels/_ops/hta_kl_phases.py for the contract.
HTA_KL_SLICE_SCHEMAS = {
    "hta_kl_slice_max": "(Tensor x) -> Tensor",
    "hta_kl_slice_exp_sums": (
        "(Tensor x, Tensor row_max, float inv_tau) -> (Tensor, Tensor, Tensor)"
    ),
    "hta_kl_slice_histogram": "(Tensor p, Tensor prefix, int shift, int width) -> (Tensor, Tensor)",
    "hta_kl_slice_head": "(Tensor p, Tensor boundary, Tensor tied_in_head) -> Tensor",
    "hta_kl_slice_sums": (
        "(Tensor p, Tensor log_p, Tensor q, Tensor log_q, Tensor q_steps, Tensor log_q_steps, "
        "Tensor head) -> Tensor"
    ),
    "hta_kl_slice_grads": (
        "(Tensor p, Tensor log_p, Tensor q, Tensor log_q, Tensor q_steps, Tensor log_q_steps, "
        "Tensor head, Tensor totals, float inv_tau, float row_scale, bool detach_weights, "
        "int steps, bool grad_student, bool grad_teacher) -> (Tensor, Tensor, Tensor)"
    ),
}

LIBRARY = torch.library.Library("htakl", "DEF")
LIBRARY.define("hta_kl_fused" + HTA_KL_SCHEMA)
for _name, _schema in HTA_KL_SLICE_SCHEMAS.items():
    LIBRARY.define(_name + _schema)
LIBRARY.define("lif_forward" + LIF_FORWARD_SCHEMA)
LIBRARY.define("lif_backward" + LIF_BACKWARD_SCHEMA)


def _load_extension():
    try:
        return importlib.import_module("htakl_kernels._C"), None
    except ImportError as error:  # not built: the reference (and Triton) still work
        return None, error


EXTENSION, EXTENSION_ERROR = _load_extension()


def extension_built_with_cuda() -> bool:
    return _BUILT_WITH_CUDA


# Read once: torch.compile cannot trace the extension's plain C function, and it never changes.
_BUILT_WITH_CUDA = EXTENSION is not None and bool(EXTENSION.built_with_cuda())


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every backend accumulates in for inputs of `dtype` (docs/SPEC.md section 1):
    float64 stays float64; float32 and the 16-bit types accumulate in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
