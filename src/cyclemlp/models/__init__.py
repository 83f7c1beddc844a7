"""The network: :class:`~cyclemlp.models.cyclemlp.CycleMLP` and its timm registration
(:mod:`.cyclemlp`), the authors' checkpoint layout (:mod:`.checkpoint`) and rebuilding a model
from a file alone (:mod:`.factory`)."""
