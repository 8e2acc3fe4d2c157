"""Parameter counts of our models at the published papers' settings, beside the published counts.

    python -m benchmarks.parameter_counts          # prints a Markdown table (benchmarks/README.md)

Each model is built by RecBole (``get_model``) on an item table of the published size (the Hydra4Rec
paper's Table 4: ML-1M 3,417 items, Video_Games 26,355, Beauty_and_Personal_Care 211,452; RecBole's
table has one row per item id, padding included, which is how the paper's SASRec counts come out):
  - SASRec: RecBole's, hidden 64, 2 layers, inner size 256, 2 heads, 50 positions;
  - Mamba4Rec, Mamba2Rec, Hydra4Rec: our packaged defaults, the Mamba4Rec paper's configuration
    (hidden 64, 1 layer, d_state 32, expand 2; d_conv 4, Hydra's 7; headdim 16).
No data is loaded and nothing is trained.
"""
import logging

from benchmarks.common import count_parameters, import_recbole_ssm

# The Hydra4Rec paper's Table 4 (items after its preprocessing).
ITEMS = {"ML-1M": 3417, "Video_Games": 26355, "Beauty_and_Personal_Care": 211452}
# The Hydra4Rec paper's Tables 1-3: (params, params without embeddings); None where not reported.
PUBLISHED = {
    "ML-1M": {"SASRec": (321984, 100096), "Mamba4Rec": (297312, 78624), "Mamba2Rec": (297312, 78624),
              "Hydra4Rec": (286854, None)},
    "Video_Games": {"SASRec": (1790016, 100096), "Mamba4Rec": (1765344, 78624),
                    "Mamba2Rec": (1765344, 78624), "Hydra4Rec": (751238, None)},
    "Beauty_and_Personal_Care": {"SASRec": (13636224, 100096), "Mamba4Rec": (13605184, 78624),
                                 "Mamba2Rec": (13605184, 78624), "Hydra4Rec": (842694, None)},
}
SETTINGS = {"SASRec": {"hidden_size": 64, "inner_size": 256, "n_layers": 2, "n_heads": 2,
                       "MAX_ITEM_LIST_LENGTH": 50},
            "Mamba4Rec": {}, "Mamba2Rec": {}, "Hydra4Rec": {}}


class ItemTable:
    """What a RecBole sequential model reads from its dataset when it is built: the item count."""

    def __init__(self, items):
        self.items = items

    def num(self, field):
        return self.items


def count(model, items):
    """count_parameters of ``model`` at SETTINGS, built by RecBole on ``items`` item ids."""
    from recbole.config import Config
    from recbole.utils import get_model

    config = Config(model=model, dataset="parameter-count",
                    config_dict={"use_gpu": False, "train_neg_sample_args": None, **SETTINGS[model]})
    return count_parameters(get_model(model)(config, ItemTable(items)))


def table():
    """Markdown rows: dataset, model, ours, published."""
    import_recbole_ssm()
    logging.disable(logging.INFO)  # RecBole's model summaries
    lines = ["| dataset (items) | model | ours: params | ours: w/o embeddings | published: params | "
             "published: w/o embeddings |", "|---|---|---|---|---|---|"]
    for dataset, items in ITEMS.items():
        for model, (params, without) in PUBLISHED[dataset].items():
            ours = count(model, items)
            lines.append(f"| {dataset} ({items:,}) | {model} | {ours['params']:,} | "
                         f"{ours['params_without_embeddings']:,} | {params:,} | "
                         f"{'-' if without is None else f'{without:,}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
