"""What is read from disk and how it is held: per-rank reads (safetensors, GGUF), fp8 and quantized files, GGUF
layers kept quantized, LoRA."""
