"""The blocks' constructors refuse sizes they cannot be built with, naming the argument."""
import pytest

from recbole_ssm.modules.hydra import HydraBlock
from recbole_ssm.modules.mamba import MambaBlock
from recbole_ssm.modules.mamba2 import Mamba2Block

SIZES = {
    MambaBlock: ("d_state", "d_conv", "expand", "dt_rank"),
    Mamba2Block: ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"),
    HydraBlock: ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"),
}


@pytest.mark.parametrize("block,argument", [(b, a) for b, names in SIZES.items() for a in names])
@pytest.mark.parametrize("value", [0, -2, 2.0, True])
def test_sizes_must_be_positive_integers(block, argument, value):
    with pytest.raises(ValueError, match=rf"^{argument} must be an integer >= 1, got {value!r}$"):
        block(8, **{argument: value})
