import json

import matplotlib

matplotlib.use("Agg")

from nbkit.notebook.plots import loss_terms


def test_loss_terms_plots_the_logged_terms_only(tmp_path):
    rows = [{"step": i + 1, "loss": 1.0 + i, "instance": 0.5, "prior": 0.5 + i} for i in range(5)]
    path = tmp_path / "losses.json"
    path.write_text(json.dumps(rows))
    ax = loss_terms(path, smooth=2)
    labels = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert labels == ["total", "instance", "prior"]
    ax = loss_terms([{"loss": 1.0}, {"loss": 0.5}])  # a run without prior preservation: just the total
    assert [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")] == ["total"]
