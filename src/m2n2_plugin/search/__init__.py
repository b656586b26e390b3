"""Search: the ``m2n2 evolve`` loop, its config, fitness, run state and workers.

It draws parents with the hub sampler, merges them with :mod:`m2n2_plugin.merge`, scores the
child with lm-eval, and hands what it keeps to :mod:`m2n2_plugin.report` to write.
"""
