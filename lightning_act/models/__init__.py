"""Architectures: one file per model (KAT registers with timm on import)."""
