"""The nodes' category and the config type they pass (the engine itself is reached through nodes/engine.py)."""
CATEGORY = "parallel_dit"
CONFIG_TYPE = "PARALLEL_CONFIG"
