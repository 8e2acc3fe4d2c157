"""recbole-ssm: selective state-space models for sequential recommendation, as a RecBole plugin.

``import recbole_ssm`` makes RecBole 1.2.1 work on current NumPy/PyTorch (see :mod:`recbole_ssm.compat`)
and registers our models, so ``run_recbole(model="Mamba4Rec", ...)`` and ``get_model("Mamba4Rec")``
work like they do for RecBole's built-in models.
"""
from recbole_ssm import compat

compat.apply()

from recbole_ssm import registry  # noqa: E402  (after the fixes: registering imports RecBole)
from recbole_ssm.models.hydra4rec import Hydra4Rec  # noqa: E402
from recbole_ssm.models.mamba2rec import Mamba2Rec  # noqa: E402
from recbole_ssm.models.mamba4rec import Mamba4Rec  # noqa: E402

registry.register()

__version__ = "0.1.0"
__all__ = ["Hydra4Rec", "Mamba2Rec", "Mamba4Rec"]
