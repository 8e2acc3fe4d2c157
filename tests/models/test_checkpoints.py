"""RecBole checkpoints of Mamba2Rec and Hydra4Rec reload whole: every tensor, and the test results
(Mamba4Rec's: tests/test_compat.py)."""
import pytest
import torch
from recbole.quick_start import load_data_and_model
from recbole.utils import get_model, get_trainer


@pytest.mark.parametrize("model", ["Mamba2Rec", "Hydra4Rec"])
def test_checkpoint_reloads_state_and_results(model, make_config, ml100k, tmp_path):
    config = make_config(model, checkpoint_dir=str(tmp_path), metric_decimal_place=10)  # not 4
    torch.manual_seed(0)
    net = get_model(model)(config, ml100k[1]._dataset)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)  # weights that no fresh model has
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, net)
    trainer._save_checkpoint(0, verbose=False)
    expected = trainer.evaluate(ml100k[3], load_best_model=False)

    config, reloaded, _, _, _, test_data = load_data_and_model(trainer.saved_model_file)
    assert type(reloaded) is type(net)
    assert reloaded.state_dict().keys() == net.state_dict().keys()
    for name, tensor in net.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, rtol=0, atol=0)
    again = get_trainer(config["MODEL_TYPE"], config["model"])(config, reloaded).evaluate(
        test_data, load_best_model=False)
    assert dict(again) == pytest.approx(dict(expected), rel=0, abs=1e-9)
