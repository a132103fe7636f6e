"""MG-LLaVA on LLaVA-1.5 (llava-hf layout): a high-resolution ConvNeXt branch fused into the CLIP tokens by a
Conv-Gate, and object tokens pooled from the high-resolution features, composed onto the host's loaded model."""
