"""phyai-cache's lab: what measures and demonstrates the library, and what phyai never installs.

- :mod:`.bench`: the quality/speed benchmark on the shipped reference models (``phyai-cache bench``),
  and the ``tune`` / ``calibrate`` commands around the library's :func:`phyai_cache.tune` and
  :func:`phyai_cache.calibrate`;
- :mod:`.reference`: the trained reference models (a digits image DiT, a moving-digits video DiT)
  and their weights;
- :mod:`.serving`: a reference step-level serving loop over the reference model, and its bench;
- :mod:`.testing`: tiny offline pipelines for every diffusers family, phyai's models on a CPU, and
  the support matrix (``phyai-cache support``).

It depends on the library (``phyai_cache``); the library never imports it.
"""
