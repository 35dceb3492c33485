"""Pure-PyTorch oracles (autograd-differentiated), mirroring shared/SPEC.md step by step."""

from .hta_kl import head_mask, hta_kl_div, hta_kl_rows, reduce_rows

__all__ = ["head_mask", "hta_kl_div", "hta_kl_rows", "reduce_rows"]
