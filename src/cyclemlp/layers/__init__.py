"""The operator: Cycle FC (:mod:`.cycle_fc`), the fused kernels of the CycleMLP block
(:mod:`.kernels`), the native CPU shift (:mod:`.native`) and the switch between the readable and
the fused forward passes (:mod:`.config`: :func:`set_fused`, ``CYCLEMLP_FUSED=0``)."""

from .config import fused_applies, set_fused, use_fused

__all__ = ["fused_applies", "set_fused", "use_fused"]
