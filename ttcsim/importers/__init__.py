"""Importers: public measurement sets turned into ttcsim run records.

* :mod:`ttcsim.importers.mlenergy` -- the ML.ENERGY Leaderboard v2 LLM
  text-generation results (vLLM 0.5.4), ``ttcsim import mlenergy``.
"""
