"""llamafactory-vision: grounding, editing and multi-granularity vision fine-tuning for LLaMA-Factory."""

__version__ = "0.1.0"
