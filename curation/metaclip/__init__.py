"""MetaCLIP curation: metadata, exact substring matching at automaton speed, balanced sampling."""

from curation.metaclip.stages import MetaclipBalance, MetaclipMatch

__all__ = ["MetaclipBalance", "MetaclipMatch"]
