"""Loggers that print where LLaMA-Factory's own do.

The host configures one handler and level on its library logger ``llamafactory`` (stdout, ``LLAMAFACTORY_VERBOSITY``,
and the web UI's log panel through ``add_handler``). A logger named ``llamafactory_vision.*`` is not its child, so
its INFO lines went nowhere; ours are named ``llamafactory.vision.*`` to inherit that handler and level.
"""

from __future__ import annotations

from llamafactory.extras import logging as host_logging

_PACKAGE = "llamafactory_vision"


def get_logger(module_name: str) -> host_logging._Logger:
    """The host-configured logger for one of our modules (pass ``__name__``)."""
    suffix = module_name.removeprefix(_PACKAGE).lstrip(".")
    return host_logging.get_logger(f"llamafactory.vision.{suffix}" if suffix else "llamafactory.vision")
