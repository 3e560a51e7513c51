"""LightningModules: one task per file."""
