"""Declarative grounding template specs (YAML), shipped as package data of llamafactory_vision.templates."""
