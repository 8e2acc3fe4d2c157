"""A checkpoint saved by RecBole's trainer on one device scores alike on the other: trained on the GPU
and scored on the CPU, and the reverse."""
import pytest
import torch
from recbole.utils import get_model, get_trainer, init_seed

from recbole_ssm.compat import load_checkpoint
from tests.conftest import MODELS, with_backend
from tests.gpu.settings import DEVICE, MODEL_TOLERANCE, REFERENCE

pytestmark = pytest.mark.gpu

CPU = torch.device("cpu")
# The same weights through the same PyTorch path on the two devices: float32 rounding only.
ACROSS_DEVICES = 1e-4


def train_one_epoch(make_config, ml100k, model, device, checkpoint_dir):
    """Train ``model`` for one epoch on ``device`` through RecBole's trainer; (net, checkpoint path)."""
    config = make_config(model, epochs=1, checkpoint_dir=str(checkpoint_dir))
    config["device"] = device
    init_seed(config["seed"], config["reproducibility"])
    net = get_model(model)(config, ml100k[1]._dataset).to(device)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, net)
    trainer.fit(ml100k[1], valid_data=None, saved=True, show_progress=False)
    return net.eval(), trainer.saved_model_file


def scores(net, batch, device, backend):
    with torch.no_grad():
        return with_backend(net, backend).to(device).full_sort_predict(batch.to(device)).cpu()


@pytest.mark.parametrize("trained_on, scored_on", [(DEVICE, CPU), (CPU, DEVICE)], ids=["GPU to CPU", "CPU to GPU"])
@pytest.mark.parametrize("model", MODELS)
def test_checkpoint_moves_between_devices(make_config, ml100k, model, trained_on, scored_on, tmp_path,
                                          check_close):
    """The reloaded model's scores equal the trained one's: through the PyTorch path on both devices
    within ACROSS_DEVICES, and through each device's default path (the fused kernels on the GPU, the
    compiled ones on the CPU) within the fused kernels' tolerance."""
    trained, path = train_one_epoch(make_config, ml100k, model, trained_on, tmp_path)
    checkpoint = load_checkpoint(path, map_location=scored_on)
    reloaded = get_model(model)(checkpoint["config"], ml100k[1]._dataset).to(scored_on)
    reloaded.load_state_dict(checkpoint["state_dict"])
    reloaded.eval()
    assert all(p.device.type == scored_on.type for p in reloaded.parameters())
    batch = next(iter(ml100k[1]))
    check_close(scores(reloaded, batch, scored_on, REFERENCE), scores(trained, batch, trained_on, REFERENCE),
                ACROSS_DEVICES, "PyTorch path, reloaded vs trained")
    check_close(scores(reloaded, batch, scored_on, "auto"), scores(trained, batch, trained_on, "auto"),
                MODEL_TOLERANCE[model], "default paths, reloaded vs trained")
