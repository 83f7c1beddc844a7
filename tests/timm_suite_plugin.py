"""A pytest plugin that runs timm's own model tests (``tests/test_models.py`` of timm's source
distribution) on CycleMLP models: ``pytest -p timm_suite_plugin --cyclemlp-models cyclemlp_b1,...``.

It imports ``cyclemlp`` (which registers the models with timm) and narrows ``timm.list_models``,
from which that file draws its parameters, to the models named; select them with ``-k cyclemlp``
(the file also has tests of fixed timm models).
"""

from __future__ import annotations

import fnmatch

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--cyclemlp-models", default="cyclemlp_*",
                     help="comma-separated model names or patterns to test (default: cyclemlp_*)")


def pytest_configure(config: pytest.Config) -> None:
    import timm

    import cyclemlp  # noqa: F401  (registers the models)

    patterns = config.getoption("cyclemlp_models").split(",")
    list_models = timm.list_models

    def cyclemlp_models(*args, **kwargs) -> list[str]:
        # with include_tags the names carry a pretrained tag: "cyclemlp_b1.in1k"
        return [name for name in list_models(*args, **kwargs)
                if any(fnmatch.fnmatchcase(name.split(".")[0], pattern) for pattern in patterns)]

    timm.list_models = cyclemlp_models
