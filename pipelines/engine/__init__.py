"""The engine: config, plan, the per-shard chain, phases, ledger, run directory, driver and runners.

It exports nothing itself; import its modules (``pipelines.engine.execute``, ``.plan``, ...).
"""
