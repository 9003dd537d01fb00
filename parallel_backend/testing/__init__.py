"""Test and benchmark helpers (synthetic checkpoints, the SPMD harness); the product never imports them."""
