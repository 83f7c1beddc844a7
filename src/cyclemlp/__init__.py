"""CycleMLP: A MLP-like Architecture for Dense Prediction (Chen et al., ICLR 2022).

Importing the package registers ``cyclemlp_b1`` ... ``cyclemlp_b5``, ``cyclemlp_t``,
``cyclemlp_s`` and ``cyclemlp_b`` with timm::

    import cyclemlp, timm
    model = timm.create_model("cyclemlp_b1", num_classes=10)
"""

from .checkpoint import CheckpointError, CheckpointMismatchError, LoadReport, load_checkpoint, save_weights
from .cycle_fc import CycleFC, cycle_fc, cycle_offsets, cycle_shift
from .flops import Cost, count_cost
from .model import BRANCHES, MODEL_CONFIGS, CycleBlock, CycleMixer, CycleMLP, create

__version__ = "0.1.0"

__all__ = [
    "BRANCHES",
    "MODEL_CONFIGS",
    "CheckpointError",
    "CheckpointMismatchError",
    "Cost",
    "CycleBlock",
    "CycleFC",
    "CycleMLP",
    "CycleMixer",
    "LoadReport",
    "count_cost",
    "create",
    "cycle_fc",
    "cycle_offsets",
    "cycle_shift",
    "load_checkpoint",
    "save_weights",
]
