"""Visual grounding for Qwen2-VL, Qwen2.5-VL and Qwen3-VL: box codecs, data format, templates, metrics."""
