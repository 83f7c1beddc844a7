"""CycleMLP: A MLP-like Architecture for Dense Prediction (Chen et al., ICLR 2022).

Importing the package registers ``cyclemlp_b1`` ... ``cyclemlp_b5``, ``cyclemlp_t``,
``cyclemlp_s`` and ``cyclemlp_b`` with timm::

    import cyclemlp, timm
    model = timm.create_model("cyclemlp_b1", num_classes=10)

The package is laid out in layers, each using only those above it:

* :mod:`cyclemlp.layers` — the operator: Cycle FC (:class:`CycleFC`) and its fast kernels;
* :mod:`cyclemlp.models` — the network (:class:`CycleMLP`, registered with timm), the authors'
  checkpoint layout (:func:`load_checkpoint`) and rebuilding models from files;
* :mod:`cyclemlp.dense` — detection and segmentation adapters (torchvision, smp);
* :mod:`cyclemlp.data` — classification datasets and loaders;
* :mod:`cyclemlp.training` — training, evaluation and prediction of classifiers;
* :mod:`cyclemlp.tools` — FLOP counting and export;
* :mod:`cyclemlp.analysis` — the paper's analyses;
* :mod:`cyclemlp.cli` — the ``cyclemlp`` command.

The names below are loaded on first use, so ``import cyclemlp`` (and the command line's
``--help``) does not pay for importing PyTorch. The timm registration happens as soon as timm is
imported, before or after this package.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

__version__ = "0.2.0"

# public name -> module that defines it
_EXPORTS = {
    "CycleFC": "layers.cycle_fc", "cycle_fc": "layers.cycle_fc", "cycle_offsets": "layers.cycle_fc",
    "cycle_shift": "layers.cycle_fc",
    "BRANCHES": "models.cyclemlp", "MODEL_CONFIGS": "models.cyclemlp", "CycleBlock": "models.cyclemlp",
    "CycleMixer": "models.cyclemlp", "CycleMLP": "models.cyclemlp", "create": "models.cyclemlp",
    "LoadReport": "models.checkpoint", "load_checkpoint": "models.checkpoint", "quantize_int8": "models.int8",
    "CheckpointError": "io", "CheckpointMismatchError": "io", "save_weights": "io",
    "Cost": "tools.flops", "count_cost": "tools.flops",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


def _register_with_timm() -> None:
    importlib.import_module(".models.cyclemlp", __name__)


class _AfterTimmImport:
    """A meta-path finder that registers the models once ``timm`` has been imported."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module: Any) -> None:
            exec_module(module)
            _register_with_timm()

        spec.loader.exec_module = exec_and_register  # type: ignore[method-assign]
        return spec


if "timm" in sys.modules:
    _register_with_timm()
else:
    sys.meta_path.insert(0, _AfterTimmImport())
