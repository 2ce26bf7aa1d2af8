"""TurningPoint-GRPO: step-level credit assignment for GRPO fine-tuning of flow-matching models."""

__version__ = "0.1.0"
