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
import warnings
from collections.abc import Callable
from types import ModuleType

SUPPORTED_HOST_VERSION = "0.9.5"
_APPLIED_ATTR = "__llamafactory_vision_hooks__"
_deferred: dict[str, list[tuple[Callable[[ModuleType], None], ModuleType]]] = {}


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


def extend_arguments(parser: ModuleType) -> None:
    """``hparams.parser._TRAIN_ARGS/_INFER_ARGS/_EVAL_ARGS``: swap in our argument subclasses so our YAML keys parse
    (unknown keys still raise), and wrap ``_parse_train_args/_parse_infer_args/_parse_eval_args`` to validate settings
    that span several argument groups (template vs. model family) at start-up."""
    hparams = _ours("llamafactory_vision.hparams")
    replacements = {
        parser.DataArguments: hparams.VisionDataArguments,
        parser.FinetuningArguments: hparams.VisionFinetuningArguments,
    }
    for arg_list in (parser._TRAIN_ARGS, parser._INFER_ARGS, parser._EVAL_ARGS):
        arg_list[:] = [replacements.get(cls, cls) for cls in arg_list]

    for name in ("_parse_train_args", "_parse_infer_args", "_parse_eval_args"):
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
    beside the adapter or model, so it is copied into ``export_dir`` too."""
    host_export = tuner.export_model

    @functools.wraps(host_export)
    def export_model(args=None):
        host_export(args)
        _ours("llamafactory_vision.grounding.bbox_head").export_head(tuner.get_infer_args(args))

    tuner.export_model = export_model


# Order matters for modules imported before install(): plugins before the templates that use them.
HOOKS: dict[str, tuple[Callable[[ModuleType], None], ...]] = {
    "llamafactory.data.mm_plugin": (register_mm_plugins,),
    "llamafactory.data.template": (register_templates,),
    "llamafactory.data.parser": (extend_dataset_attr,),
    "llamafactory.data.converter": (register_dataset_converter,),
    "llamafactory.data.loader": (wrap_align_dataset, select_dataset_processor),
    "llamafactory.hparams.parser": (extend_arguments,),
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


def _run(hook: Callable[[ModuleType], None], module: ModuleType) -> None:
    try:
        hook(module)
    except _Deferred as wait:
        _deferred.setdefault(wait.module_name, []).append((hook, module))


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
