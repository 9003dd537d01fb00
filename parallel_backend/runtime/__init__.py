"""What runs where: the worker group and the rank process, one rank's model (built, parallelized, loaded), the
shared-memory transport, progress and Cancel, mesh and rendezvous, and the multi-node half (admission, other nodes'
ranks, node 0 driving them)."""
