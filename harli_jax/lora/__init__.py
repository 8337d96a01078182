"""LoRA adapters, the Optax trainer and its micro-step programs, data pipeline, checkpoints."""
