"""The operator: Cycle FC (:mod:`.cycle_fc`), the fast kernels of the CycleMLP block
(:mod:`.kernels`) and the native CPU shift (:mod:`.native`)."""
