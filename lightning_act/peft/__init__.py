"""Parameter-efficient fine-tuning baselines (LoRA, (IA)³) for comparison with Dopamine gates."""

from lightning_act.peft.lora import IA3Scale, LoRALinear, apply_ia3, apply_lora, count_trainable

__all__ = ["IA3Scale", "LoRALinear", "apply_ia3", "apply_lora", "count_trainable"]
