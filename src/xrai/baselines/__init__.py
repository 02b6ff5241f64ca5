"""Non-amortized reconstruction baselines run on the same datasets as X-RAI.

* :mod:`xrai.baselines.emc`: expand-maximize-compress (Loh & Elser 2009, as in Dragonfly),
  ``xrai emc``.
"""
