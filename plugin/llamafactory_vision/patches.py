"""Every place where llamafactory-vision reaches into LLaMA-Factory 0.9.5, in one file.

:data:`HOOKS` maps a host module to the functions that extend it; :mod:`llamafactory_vision._bootstrap` runs them
when that module finishes importing (or at once, for modules imported earlier). One function per host symbol; each
names what it touches and why. Registrations go through the host's own registries; where the host has none, a module
attribute is wrapped, and the wrapper falls through to the original for everything that is not ours, so stock runs
behave exactly as before.

Kept free of heavy imports at module level: the bootstrap imports this file on the first ``llamafactory.*`` import.
Hooks get our modules through :func:`_ours`: if that module is itself mid-import (it imported the host module that
triggered the hook), the hook is deferred and runs as soon as that module has finished.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import sys
import traceback
import warnings
from collections.abc import Callable
from types import ModuleType

SUPPORTED_HOST_VERSION = "0.9.5"
_APPLIED_ATTR = "__llamafactory_vision_hooks__"
_deferred: dict[str, list[tuple[Callable[[ModuleType], None], ModuleType]]] = {}
failed_hooks: dict[str, str] = {}  # "hook on host module" -> "ExceptionType: message", for hooks that raised


class _Deferred(Exception):
    def __init__(self, module_name: str):
        super().__init__(module_name)
        self.module_name = module_name


def _ours(name: str) -> ModuleType:
    """Import a module of ours for a hook, or defer the hook if that module is still executing."""
    from llamafactory_vision import _bootstrap

    if name in _bootstrap.executing:
        raise _Deferred(name)
    return importlib.import_module(name)


def register_mm_plugins(mm_plugin: ModuleType) -> None:
    """``data.mm_plugin.register_mm_plugin``: add our grounding plugin classes under their own names."""
    plugins = _ours("llamafactory_vision.grounding.plugin").GROUNDING_PLUGINS
    for name, plugin_class in plugins.items():
        mm_plugin.register_mm_plugin(name, plugin_class)


def register_templates(template: ModuleType) -> None:
    """``data.template.TEMPLATES``: register the declarative grounding templates from ``templates/*.yaml``."""
    _ours("llamafactory_vision.grounding.plugin")  # its plugins are registered before templates use them
    templates = _ours("llamafactory_vision.grounding.templates")
    templates.register_grounding_templates(template.TEMPLATES, sys.modules["llamafactory.data.mm_plugin"].get_mm_plugin)


def extend_dataset_attr(parser: ModuleType) -> None:
    """``data.parser.DatasetAttr``: ``get_dataset_list`` builds it by this module-level name; our subclass adds the
    grounding columns (``DatasetAttr.join`` keeps only the columns it knows)."""
    parser.DatasetAttr = _ours("llamafactory_vision.grounding.dataset_attr").GroundingDatasetAttr


def register_dataset_converter(converter: ModuleType) -> None:
    """``data.converter.register_dataset_converter``: the ``grounding`` formatting."""
    data = _ours("llamafactory_vision.grounding.data")
    converter.register_dataset_converter("grounding", data.GroundingDatasetConverter)


def wrap_align_dataset(loader: ModuleType) -> None:
    """``data.loader.align_dataset`` (imported by name from ``data.converter``): grounding rows need their row index
    for error messages and a counted skip of invalid rows, which the host's per-example ``map`` cannot give."""
    align_grounding_dataset = _ours("llamafactory_vision.grounding.data").align_grounding_dataset
    host_align = loader.align_dataset

    @functools.wraps(host_align)
    def align_dataset(dataset, dataset_attr, data_args, training_args):
        if dataset_attr.formatting == "grounding":
            return align_grounding_dataset(dataset, dataset_attr, data_args, training_args)
        return host_align(dataset, dataset_attr, data_args, training_args)

    loader.align_dataset = align_dataset


def select_dataset_processor(loader: ModuleType) -> None:
    """``data.loader._get_dataset_processor``: the bbox head needs box targets beside the tokens, which the host's
    supervised processor drops. Our workflow asks ``get_dataset`` for stage ``BBOX_STAGE`` and gets our processor;
    every other stage reaches the host's choice. With ``grounding_fast_tokenize`` a grounding template's processor
    gets a copy of the template whose plugin counts image tokens from headers (the shared template is untouched)."""
    head_data = _ours("llamafactory_vision.grounding.head_data")
    with_fast_tokenize = _ours("llamafactory_vision.grounding.plugin").with_fast_tokenize
    host_get = loader._get_dataset_processor

    @functools.wraps(host_get)
    def _get_dataset_processor(data_args, stage, template, tokenizer, processor, do_generate=False):
        template = with_fast_tokenize(template, getattr(data_args, "grounding_fast_tokenize", False))
        if stage != head_data.BBOX_STAGE:
            return host_get(data_args, stage, template, tokenizer, processor, do_generate)
        if do_generate:  # generation needs prompts only, as for plain SFT
            return host_get(data_args, "sft", template, tokenizer, processor, do_generate)
        return head_data.GroundingBBoxDatasetProcessor(
            template=template, tokenizer=tokenizer, processor=processor, data_args=data_args
        )

    loader._get_dataset_processor = _get_dataset_processor


def report_failed_hooks(parser: ModuleType) -> None:
    """``hparams.parser._parse_args`` (called by every ``_parse_*_args``): when a hook failed to install, the settings
    that needed it fail with that hook's error instead of the host's puzzling one. Registered before
    :func:`extend_arguments`, so that it is in place even when that hook is the one that failed. With every hook
    installed it only passes through."""
    host_parse = parser._parse_args

    @functools.wraps(host_parse)
    def _parse_args(*args, **kwargs):
        if not failed_hooks:
            return host_parse(*args, **kwargs)
        try:
            parsed = host_parse(*args, **kwargs)
        except ValueError as err:  # e.g. our YAML keys are unknown to the host when `extend_arguments` failed
            err.add_note(failure_report())
            raise
        template_module = sys.modules.get("llamafactory.data.template")
        for group in parsed:
            template = getattr(group, "template", None) if isinstance(group, parser.DataArguments) else None
            if template_module is not None and template is not None and template not in template_module.TEMPLATES:
                raise ValueError(f"Template {template} does not exist. {failure_report()}")
        return parsed

    parser._parse_args = _parse_args


def extend_arguments(parser: ModuleType) -> None:
    """``hparams.parser._TRAIN_ARGS/_INFER_ARGS/_EVAL_ARGS/_TRAIN_MCA_ARGS``: swap in our argument subclasses so our
    YAML keys parse (unknown keys still raise), and wrap ``_parse_train_args/_parse_infer_args/_parse_eval_args/
    _parse_train_mca_args`` to validate settings that span several argument groups (template vs. model family, stage
    vs. dataset format) at start-up."""
    hparams = _ours("llamafactory_vision.hparams")
    replacements = {
        parser.DataArguments: hparams.VisionDataArguments,
        parser.FinetuningArguments: hparams.VisionFinetuningArguments,
    }
    # `_TRAIN_MCA_ARGS` is the list `USE_MCA=1` parses with (empty without mcore_adapter).
    for arg_list in (parser._TRAIN_ARGS, parser._INFER_ARGS, parser._EVAL_ARGS, parser._TRAIN_MCA_ARGS):
        arg_list[:] = [replacements.get(cls, cls) for cls in arg_list]

    for name in ("_parse_train_args", "_parse_infer_args", "_parse_eval_args", "_parse_train_mca_args"):
        setattr(parser, name, _validated(getattr(parser, name), hparams.validate_parsed_args))


def _validated(parse: Callable, validate: Callable) -> Callable:
    @functools.wraps(parse)
    def wrapper(*args, **kwargs):
        parsed = parse(*args, **kwargs)
        validate(parsed)
        return parsed

    return wrapper


def dispatch_sft(tuner: ModuleType) -> None:
    """``train.tuner.run_sft`` (looked up by ``_training_function`` at call time): SFT runs with a grounding template
    go through our grounding workflow (IoU metrics, bbox head); every other run reaches the host's ``run_sft``."""
    is_grounding_template = _ours("llamafactory_vision.grounding.templates").is_grounding_template
    host_run_sft = tuner.run_sft

    @functools.wraps(host_run_sft)
    def run_sft(model_args, data_args, training_args, finetuning_args, generating_args, callbacks=None):
        if is_grounding_template(data_args.template):
            from llamafactory_vision.grounding.workflow import run_grounding_sft

            return run_grounding_sft(model_args, data_args, training_args, finetuning_args, generating_args, callbacks)
        return host_run_sft(model_args, data_args, training_args, finetuning_args, generating_args, callbacks)

    tuner.run_sft = run_sft


def export_bbox_head(tuner: ModuleType) -> None:
    """``train.tuner.export_model``: the host exports (and merges) the model; a bbox head lives in its own files
    beside the adapter or model, so it is copied into ``export_dir`` too whenever the checkpoint has one."""
    host_export = tuner.export_model

    @functools.wraps(host_export)
    def export_model(args=None):
        host_export(args)
        parsed = tuner.get_infer_args(args)
        source = _ours("llamafactory_vision.grounding.bbox_head").export_head(parsed)
        if source is not None:
            tuner.logger.info_rank0(f"bbox head exported too: {source} -> {parsed[0].export_dir}")

    tuner.export_model = export_model


# Order matters for modules imported before install(): plugins before the templates that use them.
HOOKS: dict[str, tuple[Callable[[ModuleType], None], ...]] = {
    "llamafactory.data.mm_plugin": (register_mm_plugins,),
    "llamafactory.data.template": (register_templates,),
    "llamafactory.data.parser": (extend_dataset_attr,),
    "llamafactory.data.converter": (register_dataset_converter,),
    "llamafactory.data.loader": (wrap_align_dataset, select_dataset_processor),
    "llamafactory.hparams.parser": (report_failed_hooks, extend_arguments),
    "llamafactory.train.tuner": (dispatch_sft, export_bbox_head),
}


@functools.cache
def check_host_version() -> None:
    """Warn once when the installed LLaMA-Factory is not the version these hooks were written against."""
    version = importlib.metadata.version("llamafactory")
    if version != SUPPORTED_HOST_VERSION:
        warnings.warn(
            f"llamafactory-vision was written for llamafactory=={SUPPORTED_HOST_VERSION}, found {version}; "
            "its hooks may not fit. Set LLAMAFACTORY_VISION_DISABLE=1 to run LLaMA-Factory without it.",
            stacklevel=2,
        )


def failure_report() -> str:
    """What was not installed and why, for error messages (empty when every hook installed)."""
    if not failed_hooks:
        return ""
    failures = "; ".join(f"{hook} raised {error}" for hook, error in failed_hooks.items())
    return (
        f"llamafactory-vision could not install part of itself into LLaMA-Factory ({failures}), so its templates, "
        "dataset formats and YAML keys that depend on it are unavailable. Stock LLaMA-Factory runs are unaffected."
    )


def _record_failure(hook: Callable[[ModuleType], None], module: ModuleType, err: Exception) -> None:
    where = f"{hook.__name__} on {module.__name__}"
    failed_hooks[where] = f"{type(err).__name__}: {err}"
    # Printed straight to stderr (not `warnings`, which filters can hide): a user must see what is missing.
    sys.stderr.write(
        f"WARNING llamafactory-vision: hook {where} failed and was not installed ({type(err).__name__}: {err}). "
        "LLaMA-Factory itself keeps working; llamafactory-vision features that need this hook will refuse to run. "
        "Traceback:\n" + "".join(traceback.format_exception(err))
    )


def _run(hook: Callable[[ModuleType], None], module: ModuleType) -> None:
    try:
        hook(module)
    except _Deferred as wait:
        _deferred.setdefault(wait.module_name, []).append((hook, module))
    except Exception as err:  # noqa: BLE001
        # The one justified catch-all: hooks run inside the host's own `import llamafactory.*`, so anything escaping
        # here would make that import fail and break stock LLaMA-Factory for everyone in this environment. The error
        # is reported on stderr and recorded; settings of ours then refuse to run with it (see report_failed_hooks).
        _record_failure(hook, module, err)


def apply(module: ModuleType) -> None:
    """Run the hooks registered for ``module`` once (idempotent: a marker on the module records it)."""
    hooks = HOOKS.get(module.__name__, ())
    if not hooks or getattr(module, _APPLIED_ATTR, False):
        return
    check_host_version()
    setattr(module, _APPLIED_ATTR, True)
    for hook in hooks:
        _run(hook, module)


def run_deferred(module_name: str) -> None:
    """Run, in the order they were deferred, the hooks that waited for our module ``module_name`` to finish."""
    for hook, module in _deferred.pop(module_name, []):
        _run(hook, module)


def apply_to_imported() -> None:
    """Extend host modules that were imported before the import hook was installed."""
    for name in HOOKS:
        module = sys.modules.get(name)
        if module is not None:
            apply(module)
