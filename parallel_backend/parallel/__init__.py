"""How one model is split: the plan and its appliers (TP layers, sequence split hooks, sequence-parallel attention
and its kernels), model patches on split tokens, replicas, pipeline stages, sharded weights, and the collectives
they use. The order they are applied in is runtime/parallelize.py's."""
