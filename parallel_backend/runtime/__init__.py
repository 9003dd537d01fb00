"""What runs where: the worker group, the rank process, shared-memory transport, mesh and rendezvous."""
