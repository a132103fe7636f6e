"""Import hook that extends LLaMA-Factory modules as they are imported.

Run from ``llamafactory_vision.pth`` at interpreter start, so it must stay standard-library only and cheap: until a
``llamafactory`` module is imported it costs one string comparison per import. When one of the host modules we
extend (listed in :data:`llamafactory_vision.patches.HOOKS`) finishes executing, the hooks registered for it run.
Modules imported before :func:`install` are extended at once. Set ``LLAMAFACTORY_VISION_DISABLE=1`` to turn it off.

Our own modules are loaded through the same wrapper so that :data:`executing` knows which of them are mid-import:
a hook that runs while any of them is mid-import (say, our plugin subclass while its host base class is being
imported on its behalf) waits until the innermost has finished (see ``patches._ours``).
"""

import importlib.abc
import os
import sys
import traceback

DISABLE_ENV = "LLAMAFACTORY_VISION_DISABLE"
_HOST_PREFIX = "llamafactory."
_OWN_PREFIX = "llamafactory_vision."
_NOT_WRAPPED = frozenset({"llamafactory_vision._bootstrap", "llamafactory_vision.patches"})

executing: list[str] = []  # our modules whose code is running right now, outermost first


def is_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _patches():
    """``llamafactory_vision.patches``, or None (said once on stderr) when it cannot be imported.

    Catching every exception is deliberate here: this runs inside the host's own imports, and an error escaping
    would break stock LLaMA-Factory for everyone in the environment; without ``patches`` the host runs unextended.
    """
    global _patches_error
    if _patches_error is not None:
        return None
    try:
        from llamafactory_vision import patches
    except Exception as err:  # noqa: BLE001 (see the docstring)
        _patches_error = err
        sys.stderr.write(
            f"WARNING llamafactory-vision: its hooks module failed to import ({type(err).__name__}: {err}); "
            f"nothing of it is installed into LLaMA-Factory, which runs unextended (set {DISABLE_ENV}=1 to silence "
            "this). Traceback:\n" + "".join(traceback.format_exception(err))
        )
        return None
    return patches


_patches_error: Exception | None = None


class _PatchingLoader(importlib.abc.Loader):
    """Delegates to the host module's own loader, then applies our hooks to the executed module."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        name = module.__name__
        if name.startswith(_HOST_PREFIX):
            self._loader.exec_module(module)
            patches = _patches()
            if patches is not None:
                patches.apply(module)  # reports (never raises) a hook that fails
            return
        executing.append(name)
        try:
            self._loader.exec_module(module)
        finally:
            executing.remove(name)
        patches = _patches()
        if patches is not None:
            patches.run_deferred(name)

    def __getattr__(self, name):  # get_source, get_code, is_package, ... for tools that introspect loaders
        return getattr(self._loader, name)


class HostModuleFinder(importlib.abc.MetaPathFinder):
    """Finds host modules through the remaining finders and wraps their loader with :class:`_PatchingLoader`."""

    def find_spec(self, fullname, path, target=None):
        if fullname.startswith(_OWN_PREFIX):
            if fullname in _NOT_WRAPPED:
                return None
        elif fullname.startswith(_HOST_PREFIX):
            patches = _patches()
            if patches is None or fullname not in patches.HOOKS:
                return None
        else:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and not isinstance(spec.loader, _PatchingLoader):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once) and extend host modules that are already imported."""
    if is_disabled() or any(isinstance(f, HostModuleFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, HostModuleFinder())
    if any(name.startswith(_HOST_PREFIX) for name in sys.modules):
        patches = _patches()
        if patches is not None:
            patches.apply_to_imported()
