"""Evaluation protocols that turn model outputs into task-level metrics (pure functions)."""
