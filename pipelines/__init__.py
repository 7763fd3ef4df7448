"""How a pool becomes a curated dataset: the stage SDK, the engine that runs stages over shards, and
the rooms around it (input, download, export, dataset card, command line, demo).

Sub-packages: :mod:`pipelines.stage` (the one door ``curation`` and ``generators`` use),
:mod:`pipelines.engine`, :mod:`pipelines.source`, :mod:`pipelines.download`,
:mod:`pipelines.export`, :mod:`pipelines.card`, :mod:`pipelines.cli`, :mod:`pipelines.demo`.
"""
