"""Fused kernels for distilling spiking neural networks with head-tail-aware KL (HTA-KL).

Public API: :func:`hta_kl_div`, :class:`HTAKLLoss`, :class:`SpikingKDLoss`,
:func:`fused_linear_hta_kl_div`, :func:`fused_linear_spiking_kd_loss`,
:class:`FusedLinearHTAKLLoss`, :class:`FusedLinearSpikingKDLoss`, :func:`lif_multistep`,
:class:`MultiStepLIF`, :func:`reset_net`, :func:`available_backends`,
and the pure-PyTorch oracle :mod:`htakl_kernels.reference`.
"""

from . import reference
from ._backends import available_backends
from .hta_kl import hta_kl_div
from .lif import lif_multistep
from .neurons import MultiStepLIF, reset_net
from .losses import HTAKLLoss, SpikingKDLoss
from .fused_linear import (
    FusedLinearHTAKLLoss, FusedLinearSpikingKDLoss, fused_linear_hta_kl_div,
    fused_linear_spiking_kd_loss,
)

__all__ = [
    "FusedLinearHTAKLLoss", "FusedLinearSpikingKDLoss", "HTAKLLoss", "MultiStepLIF",
    "SpikingKDLoss", "available_backends", "fused_linear_hta_kl_div",
    "fused_linear_spiking_kd_loss", "hta_kl_div", "lif_multistep", "reference", "reset_net",
]
