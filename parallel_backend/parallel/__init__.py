"""How one model is split: attention, collectives, tensor-parallel layers, the plan applier, replicas."""
