"""The dataset card of a run directory: header, funnel, cutoffs, score plots, examples, topic sections."""

from pipelines.card.writer import CARD, write_card

__all__ = ["CARD", "write_card"]
