"""LoRA adapters, the Optax trainer and its micro-step programs, data pipeline, checkpoints, PEFT export."""

from harli_jax.lora.adapters import LoRAConfig, init_lora, load_peft
from harli_jax.lora.adapters import export_peft as export_peft_adapters


def export_peft(handle_or_adapters, path, lora: LoRAConfig | None = None, cfg=None):
    """Writes an adapter in the HF PEFT format: from a `JobHandle`, or from adapters with their LoRAConfig and
    ModelConfig."""
    if hasattr(handle_or_adapters, "export_peft"):
        return handle_or_adapters.export_peft(path)
    if lora is None or cfg is None:
        raise ValueError("exporting raw adapters needs their LoRAConfig and the ModelConfig")
    return export_peft_adapters(handle_or_adapters, lora, cfg, path)


__all__ = ["LoRAConfig", "export_peft", "init_lora", "load_peft"]
