"""Test suite (a regular package so it wins the name `tests` over a host's own tests package)."""
