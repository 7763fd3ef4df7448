"""The dataset card of a run directory: header, funnel, samples, cutoffs, each stage's own section, examples."""

from pipelines.card.writer import CARD, write_card

__all__ = ["CARD", "write_card"]
