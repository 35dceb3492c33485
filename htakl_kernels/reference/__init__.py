"""Pure-PyTorch oracles (autograd-differentiated), mirroring docs/SPEC.md step by step."""

from .hta_kl import head_mask, hta_kl_div, hta_kl_rows, reduce_rows
from .lif import lif_multistep

__all__ = ["head_mask", "hta_kl_div", "hta_kl_rows", "lif_multistep", "reduce_rows"]
