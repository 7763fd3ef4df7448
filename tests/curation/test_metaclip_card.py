"""MetaCLIP's card section helpers: the rank-frequency plot stays small for a million entries."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from curation.metaclip.card import EntryFrequency, entry_frequency_figure, log_spaced
from pipelines.card.figures import to_png
from pipelines.card.view import CardView


def test_entry_frequency_plot_draws_a_few_thousand_points_for_a_million_entries():
    ranks = log_spaced(1_000_000)
    assert len(ranks) <= 2000 and ranks[0] == 0 and ranks[-1] == 999_999 and np.all(np.diff(ranks) > 0)
    counts = np.random.default_rng(0).zipf(1.5, 1_000_000).astype(np.int64)
    frequency = EntryFrequency(after=np.minimum(counts, 300), before=counts, threshold=300)
    assert frequency.kept_share(head=False) == 1.0 and frequency.kept_share(head=True) < 1.0
    view = CardView(rundir=None, manifest=None, stage="metaclip_balance", summary=None)
    figure = entry_frequency_figure(view, frequency)
    assert sum(len(line.get_xdata()) for line in figure.axes[0].lines if len(line.get_xdata()) > 2) <= 4000
    with Image.open(io.BytesIO(to_png(figure))) as image:
        assert image.format == "PNG"
