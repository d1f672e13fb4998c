"""Pure physics: FLOPs, bytes, times, power and energy of LLM inference."""
