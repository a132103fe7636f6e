"""MGIE-style instruction-based image editing: `stage: edit`, its data format, edit head, trainer and pipeline."""
