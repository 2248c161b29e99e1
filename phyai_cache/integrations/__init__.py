"""Integrations with the serving stacks that run phyai_cache: one module per client.

* :mod:`phyai_cache.integrations.phyai`: phyai's own runners and schedulers (one call attaches a cache
  to a runner or scheduler; requests carry their own ``dit_cache``).
"""
