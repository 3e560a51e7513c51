"""Parameter-efficient fine-tuning baselines (LoRA, (IA)³) for comparison with Dopamine gates."""
