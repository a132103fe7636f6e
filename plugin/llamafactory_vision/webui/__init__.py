"""LLaMA Board additions: our stages, templates, options and pictures inside the host's gradio web UI.

Everything here is built from our registries (argument dataclasses, template specs, stage names); patches.py wires
it into the host's UI functions.
"""
