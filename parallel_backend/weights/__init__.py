"""What is read from disk and how it is held: per-rank reads, fp8, LoRA."""
