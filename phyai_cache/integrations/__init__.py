"""Integrations with the serving stacks that run phyai_cache: one module per client.

* :mod:`phyai_cache.integrations.phyai`: phyai's own runners and schedulers (one call attaches a cache
  to a runner or scheduler; requests carry their own ``dit_cache``).
* :mod:`phyai_cache.integrations.phyai_collectives`: the cache's collectives through ``phyai.parallel``
  (``cache_groups()``: the ``process_group`` / ``cfg_group`` of a model on phyai's named mesh).
"""
