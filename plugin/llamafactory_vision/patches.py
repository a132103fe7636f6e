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
    """Import a module of ours for a hook, or defer the hook while any module of ours is mid-import.

    Not only ``name`` itself: ``name`` may import a module that is mid-import (a hook on ``data.parser`` wants the
    dataset-attribute classes while the one whose import pulled in ``data.parser`` has not finished). The hook runs
    again when the innermost of them finishes, and defers again while an outer one is still running.
    """
    from llamafactory_vision import _bootstrap

    if _bootstrap.executing:
        raise _Deferred(_bootstrap.executing[-1])
    return importlib.import_module(name)


def register_mm_plugins(mm_plugin: ModuleType) -> None:
    """``data.mm_plugin.register_mm_plugin``: add our grounding and Draw&Guess plugin classes under their own names."""
    plugins = {
        **_ours("llamafactory_vision.grounding.plugin").GROUNDING_PLUGINS,
        **_ours("llamafactory_vision.strokes.plugin").STROKE_PLUGINS,
        **_ours("llamafactory_vision.fusion.plugin").MG_PLUGINS,
    }
    for name, plugin_class in plugins.items():
        mm_plugin.register_mm_plugin(name, plugin_class)


def register_templates(template: ModuleType) -> None:
    """``data.template.TEMPLATES``: register the declarative templates from ``templates/*.yaml`` (grounding) and
    ``templates/strokes/*.yaml`` (Draw&Guess), and ``llava_mg`` (MG-LLaVA)."""
    # Every module is resolved before anything is registered: a deferred hook re-runs from the start.
    _ours("llamafactory_vision.grounding.plugin")  # its plugins are registered before templates use them
    _ours("llamafactory_vision.strokes.plugin")
    _ours("llamafactory_vision.fusion.plugin")
    grounding = _ours("llamafactory_vision.grounding.templates")
    strokes = _ours("llamafactory_vision.strokes.templates")
    fusion = _ours("llamafactory_vision.fusion.templates")
    get_mm_plugin = sys.modules["llamafactory.data.mm_plugin"].get_mm_plugin
    grounding.register_grounding_templates(template.TEMPLATES, get_mm_plugin)
    strokes.register_stroke_templates(template.TEMPLATES, get_mm_plugin)
    fusion.register_mg_template(template.TEMPLATES, get_mm_plugin)


def register_edit_template(template: ModuleType) -> None:
    """``data.template.TEMPLATES``: add ``llava_edit`` (LLaVA v1.5's conversation, for ``stage: edit``)."""
    tokens = _ours("llamafactory_vision.editing.tokens")
    tokens.register_edit_template(template.TEMPLATES, sys.modules["llamafactory.data.mm_plugin"].get_mm_plugin)


def extend_dataset_attr(parser: ModuleType) -> None:
    """``data.parser.DatasetAttr``: ``get_dataset_list`` builds it by this module-level name; our subclass adds the
    grounding, ``stroke_guess`` and ``edit`` columns (``DatasetAttr.join`` keeps only the columns it knows)."""
    parser.DatasetAttr = _ours("llamafactory_vision.dataset_attr").VisionDatasetAttr


def register_dataset_converter(converter: ModuleType) -> None:
    """``data.converter.register_dataset_converter``: the ``grounding``, ``stroke_guess``, ``mg_llava`` and ``edit``
    formattings."""
    edit_data = _ours("llamafactory_vision.editing.data")
    converters = {  # all resolved before registering: a deferred hook re-runs from the start
        "grounding": _ours("llamafactory_vision.grounding.data").GroundingDatasetConverter,
        "stroke_guess": _ours("llamafactory_vision.strokes.data").StrokeGuessDatasetConverter,
        "mg_llava": _ours("llamafactory_vision.fusion.data").MGDatasetConverter,
        edit_data.EDIT_FORMAT: edit_data.EditDatasetConverter,
    }
    for name, converter_class in converters.items():
        converter.register_dataset_converter(name, converter_class)


def wrap_align_dataset(loader: ModuleType) -> None:
    """``data.loader.align_dataset`` (imported by name from ``data.converter``): rows of our formats need their row
    index for error messages and a counted skip of invalid rows, which the host's per-example ``map`` cannot give."""
    align_grounding_dataset = _ours("llamafactory_vision.grounding.data").align_grounding_dataset
    edit_data = _ours("llamafactory_vision.editing.data")
    ours = {
        "grounding": align_grounding_dataset,
        "stroke_guess": align_grounding_dataset,
        "mg_llava": align_grounding_dataset,
        edit_data.EDIT_FORMAT: edit_data.align_edit_dataset,
    }
    host_align = loader.align_dataset

    @functools.wraps(host_align)
    def align_dataset(dataset, dataset_attr, data_args, training_args):
        align = ours.get(dataset_attr.formatting, host_align)
        return align(dataset, dataset_attr, data_args, training_args)

    loader.align_dataset = align_dataset


def select_dataset_processor(loader: ModuleType) -> None:
    """``data.loader._get_dataset_processor``: the bbox head needs box targets beside the tokens, which the host's
    supervised processor drops. Our workflow asks ``get_dataset`` for stage ``BBOX_STAGE`` and gets our processor
    (for generation, the host's prompt-only one plus the dataset's label boxes, which predict scores against; with
    ``neat_packing``, the host's packing processor plus the box columns, after the host's own packing set-up); without
    the head it asks for ``ROWS_STAGE``: the host's SFT processors, except that generation gets the label boxes too.
    Every other stage reaches the host's choice. ``stage: edit`` gets the edit processor (target image columns). With
    ``grounding_fast_tokenize`` a grounding template's processor gets a copy of the template whose plugin counts image
    tokens from headers (the shared template is untouched)."""
    head_data = _ours("llamafactory_vision.grounding.head_data")
    head_packing = _ours("llamafactory_vision.grounding.head_packing")
    edit_data = _ours("llamafactory_vision.editing.data")
    with_fast_tokenize = _ours("llamafactory_vision.grounding.plugin").with_fast_tokenize
    host_get = loader._get_dataset_processor

    @functools.wraps(host_get)
    def _get_dataset_processor(data_args, stage, template, tokenizer, processor, do_generate=False):
        if stage == "edit":
            return edit_data.EditDatasetProcessor(
                template=template, tokenizer=tokenizer, processor=processor, data_args=data_args
            )
        template = with_fast_tokenize(template, getattr(data_args, "grounding_fast_tokenize", False))
        if stage not in (head_data.BBOX_STAGE, head_data.ROWS_STAGE):
            return host_get(data_args, stage, template, tokenizer, processor, do_generate)
        if do_generate:  # prompts only, as the host's; plus the label boxes predict scores against
            return head_data.GroundingGenerationDatasetProcessor(
                template=template, tokenizer=tokenizer, processor=processor, data_args=data_args
            )
        if stage == head_data.ROWS_STAGE:
            return host_get(data_args, "sft", template, tokenizer, processor, do_generate)
        if data_args.neat_packing:  # the host's packing processor (and its set-up), plus the box columns
            host_get(data_args, "sft", template, tokenizer, processor, do_generate)
            return head_packing.PackedGroundingBBoxDatasetProcessor(
                template=template, tokenizer=tokenizer, processor=processor, data_args=data_args
            )
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
        parser.ModelArguments: hparams.VisionModelArguments,
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
    go through our grounding workflow (IoU metrics, bbox head); MG-LLaVA runs get the callback that saves and resumes
    the added modules; every other run reaches the host's ``run_sft`` unchanged."""
    is_grounding_template = _ours("llamafactory_vision.grounding.templates").is_grounding_template
    host_run_sft = tuner.run_sft

    @functools.wraps(host_run_sft)
    def run_sft(model_args, data_args, training_args, finetuning_args, generating_args, callbacks=None):
        if getattr(model_args, "mg_hr_vision_tower", None):  # MG-LLaVA: its modules are saved beside checkpoints
            callbacks = [*(callbacks or []), _ours("llamafactory_vision.fusion.model").MGCheckpointCallback()]
        if is_grounding_template(data_args.template):
            from llamafactory_vision.grounding.workflow import run_grounding_sft

            return run_grounding_sft(model_args, data_args, training_args, finetuning_args, generating_args, callbacks)
        return host_run_sft(model_args, data_args, training_args, finetuning_args, generating_args, callbacks)

    tuner.run_sft = run_sft


def dispatch_edit_stage(tuner: ModuleType) -> None:
    """``train.tuner._training_function`` (called by ``run_exp`` at call time): its stage dispatch is a closed
    if/elif that raises on unknown stages, so runs whose config asks for ``stage: edit`` go to our copy of it
    (editing/workflow.py); every other run reaches the host's function unchanged."""
    host_training_function = tuner._training_function

    @functools.wraps(host_training_function)
    def _training_function(config):
        if _requested_stage(tuner.read_args(config.get("args"))) == "edit":
            return _ours("llamafactory_vision.editing.workflow").run_edit_stage(config)
        return host_training_function(config)

    tuner._training_function = _training_function


def _requested_stage(raw_args: dict | list) -> str | None:
    """The ``stage`` of raw training arguments (a parsed YAML/JSON dict or a ``--key value`` list)."""
    if isinstance(raw_args, dict):
        return raw_args.get("stage")
    for i, arg in enumerate(raw_args):
        if arg.startswith("--stage="):
            return arg.split("=", 1)[1]
        if arg == "--stage" and i + 1 < len(raw_args):
            return raw_args[i + 1]
    return None


def export_saved_modules(tuner: ModuleType) -> None:
    """``train.tuner.export_model``: the host exports (and merges) the model; a bbox head, MG-LLaVA's modules and an
    edit model's head/UNet live in their own files beside the adapter or model, so they are copied into ``export_dir``
    too whenever the checkpoint has them. An edit run's checkpoint is checked first: it must be exported with its
    [IMG] tokens (``add_special_tokens``)."""
    host_export = tuner.export_model

    @functools.wraps(host_export)
    def export_model(args=None):
        parsed = tuner.get_infer_args(args)
        edit_parts = _ours("llamafactory_vision.editing.parts")
        edit_parts.check_edit_export(parsed)  # before the host writes a tokenizer without the [IMG] tokens
        host_export(args)
        source = _ours("llamafactory_vision.grounding.bbox_head").export_head(parsed)
        if source is not None:
            tuner.logger.info_rank0(f"bbox head exported too: {source} -> {parsed[0].export_dir}")
        _ours("llamafactory_vision.fusion.model").export_mg(parsed)
        source = edit_parts.export_edit(parsed)
        if source is not None:
            tuner.logger.info_rank0(f"edit head and UNet exported too: {source} -> {parsed[0].export_dir}")

    tuner.export_model = export_model


def register_model_groups(constants: ModuleType) -> None:
    """``extras.constants.register_model_group``: LLaMA Board picks a model's default template by its name
    (``DEFAULT_TEMPLATE``); each host model of a family one of our templates fits gets a twin
    ``<name>-Grounding`` (same download paths, multimodal) whose default template is ours."""
    registry = _ours("llamafactory_vision.webui.registry")
    groups = registry.model_groups(
        constants.SUPPORTED_MODELS, constants.DEFAULT_TEMPLATE, constants.MULTIMODAL_SUPPORTED_MODELS
    )
    for models, template in groups:
        constants.register_model_group(models=models, template=template, multimodal=True)


def extend_training_stages(constants: ModuleType) -> None:
    """``extras.constants.TRAINING_STAGES`` (display name -> stage, read by LLaMA Board's stage list and runner):
    add our stages from ``webui.registry.STAGES``."""
    registry = _ours("llamafactory_vision.webui.registry")
    constants.TRAINING_STAGES.update(registry.training_stages(constants.TRAINING_STAGES))


def extend_locales(locales: ModuleType) -> None:
    """``webui.locales.LOCALES``: English/Chinese labels of our components (keys are our element names; a clash
    with a host key is refused rather than relabelling a stock component)."""
    ours = _ours("llamafactory_vision.webui.options")
    labels = _ours("llamafactory_vision.webui.locales")
    options = ours.train_options()
    entries = labels.build_locales({o.name: o.help for o in options}, list(dict.fromkeys(o.group for o in options)))
    clashes = sorted(set(entries) & set(locales.LOCALES))
    if clashes:
        raise ValueError(f"llamafactory-vision web UI names {clashes} clash with LLaMA Board's LOCALES keys.")
    locales.LOCALES.update(entries)


def include_pending_inputs(manager: ModuleType) -> None:
    """``webui.manager.Manager.get_base_elems``: every host tab builder wires its buttons with this set; while our
    wrapper builds a tab it also holds our controls, so the host's preview/start/save/load handlers receive them."""
    pending_attr = _ours("llamafactory_vision.webui.components").PENDING_ATTR
    host_get = manager.Manager.get_base_elems

    @functools.wraps(host_get)
    def get_base_elems(self):
        return host_get(self) | getattr(self, pending_attr, set())

    manager.Manager.get_base_elems = get_base_elems


def add_train_args(runner: ModuleType) -> None:
    """``webui.runner.Runner._parse_train_args``: our Train-tab options (non-default values) join the args that
    become the preview command and the saved training_args.yaml."""
    components = _ours("llamafactory_vision.webui.components")
    host_parse = runner.Runner._parse_train_args

    @functools.wraps(host_parse)
    def _parse_train_args(self, data):
        return components.add_options_to_args(self.manager, "train", data, host_parse(self, data))

    runner.Runner._parse_train_args = _parse_train_args


def add_eval_args(runner: ModuleType) -> None:
    """``webui.runner.Runner._parse_eval_args``: the Evaluate tab passes no image size limits (predict would see
    other sizes than training) and none of our keys (e.g. ``bbox_head`` for head boxes); add both. It always runs
    ``stage: sft``: an edit template's run becomes the edit stage's (its predict edits images and scores them)."""
    components = _ours("llamafactory_vision.webui.components")
    host_parse = runner.Runner._parse_eval_args

    @functools.wraps(host_parse)
    def _parse_eval_args(self, data):
        args = components.add_eval_pixels(self.manager, data, host_parse(self, data))
        return components.add_edit_stage(components.add_options_to_args(self.manager, "eval", data, args))

    runner.Runner._parse_eval_args = _parse_eval_args


def wrap_train_tab(interface: ModuleType) -> None:
    """``webui.interface.create_train_tab`` (imported by name from ``webui.components``): our option accordions
    and the grounding preview in the dataset preview box."""
    components = _ours("llamafactory_vision.webui.components")
    host_create = interface.create_train_tab

    @functools.wraps(host_create)
    def create_train_tab(engine):
        elem_dict = components.create_options_tab(host_create, engine, "train")
        return {**elem_dict, **components.add_grounding_preview(engine, "train", elem_dict)}

    interface.create_train_tab = create_train_tab


def wrap_eval_tab(interface: ModuleType) -> None:
    """``webui.interface.create_eval_tab``: image size limits, our options, the grounding preview and the
    prediction galleries (boxes; source / output / target of edits)."""
    components = _ours("llamafactory_vision.webui.components")
    host_create = interface.create_eval_tab

    @functools.wraps(host_create)
    def create_eval_tab(engine):
        elem_dict = components.create_options_tab(host_create, engine, "eval", components.eval_pixel_controls())
        elem_dict.update(components.add_grounding_preview(engine, "eval", elem_dict))
        elem_dict.update(components.add_prediction_gallery(engine, elem_dict))
        return {**elem_dict, **components.add_edit_gallery(engine, elem_dict)}

    interface.create_eval_tab = create_eval_tab


def wrap_infer_tab(interface: ModuleType) -> None:
    """``webui.interface.create_infer_tab``: a grounding answer drawn as boxes on the chat's input image."""
    components = _ours("llamafactory_vision.webui.components")
    host_create = interface.create_infer_tab

    @functools.wraps(host_create)
    def create_infer_tab(engine):
        elem_dict = host_create(engine)
        return {**elem_dict, **components.add_answer_boxes(engine, elem_dict)}

    interface.create_infer_tab = create_infer_tab


def load_edit_chat(chatter: ModuleType) -> None:
    """``webui.chatter.WebChatModel.load_model``: an edit checkpoint (``llava_edit``) needs its [IMG] tokens in the
    tokenizer (else its resized embeddings do not load); add them to the args the host builds, and remember the loaded
    engine as an edit model so the chat can show its edited image."""
    components = _ours("llamafactory_vision.webui.components")
    host_load = chatter.WebChatModel.load_model

    @functools.wraps(host_load)
    def load_model(self, data):
        yield from components.load_chat_model(host_load, self, data)

    chatter.WebChatModel.load_model = load_model


def show_edited_image(chatter: ModuleType) -> None:
    """``webui.chatter.WebChatModel.stream``: the host's chat engine writes an edit model's expressive instruction
    but has no edit head or UNet; once the answer is complete, our pipeline edits the input image from it and the
    picture joins the chat."""
    components = _ours("llamafactory_vision.webui.components")
    host_stream = chatter.WebChatModel.stream

    @functools.wraps(host_stream)
    def stream(self, chatbot, messages, *inputs):
        yield from components.stream_with_edit(host_stream, self, chatbot, messages, *inputs)

    chatter.WebChatModel.stream = stream


def attach_mg_llava(loader: ModuleType) -> None:
    """``model.loader.init_adapter`` (imported by name from ``model.adapter``; ``load_model`` calls it for train,
    predict, chat and export): after the host has applied LoRA/freeze/full tuning, an ``mg_hr_vision_tower`` run
    composes MG-LLaVA's modules onto the model (after, so ``lora_target: all`` never wraps them)."""
    host_init_adapter = loader.init_adapter

    @functools.wraps(host_init_adapter)
    def init_adapter(config, model, model_args, finetuning_args, is_trainable):
        model = host_init_adapter(config, model, model_args, finetuning_args, is_trainable)
        if getattr(model_args, "mg_hr_vision_tower", None):
            _ours("llamafactory_vision.fusion.model").attach_mg(model, model_args, is_trainable)
        return model

    loader.init_adapter = init_adapter


def patch_mg_processor(loader: ModuleType) -> None:
    """``model.loader.patch_processor`` (imported by name from ``model.patcher``): the host hands per-run image
    settings (``image_max_pixels``, ...) to the plugins as processor attributes; the MG high-res side goes the same
    way, so the ``llava_mg`` plugin builds inputs for the run's ``mg_hr_image_size``."""
    host_patch_processor = loader.patch_processor

    @functools.wraps(host_patch_processor)
    def patch_processor(processor, tokenizer, model_args):
        host_patch_processor(processor, tokenizer, model_args)
        if getattr(model_args, "mg_hr_vision_tower", None):
            processor.mg_hr_image_size = model_args.mg_hr_image_size

    loader.patch_processor = patch_processor


# Order matters for modules imported before install(): plugins before the templates that use them.
HOOKS: dict[str, tuple[Callable[[ModuleType], None], ...]] = {
    "llamafactory.data.mm_plugin": (register_mm_plugins,),
    "llamafactory.data.template": (register_templates, register_edit_template),
    "llamafactory.data.parser": (extend_dataset_attr,),
    "llamafactory.data.converter": (register_dataset_converter,),
    "llamafactory.data.loader": (wrap_align_dataset, select_dataset_processor),
    "llamafactory.hparams.parser": (report_failed_hooks, extend_arguments),
    "llamafactory.model.loader": (attach_mg_llava, patch_mg_processor),
    "llamafactory.train.tuner": (dispatch_sft, dispatch_edit_stage, export_saved_modules),
    "llamafactory.extras.constants": (register_model_groups, extend_training_stages),
    "llamafactory.webui.locales": (extend_locales,),
    "llamafactory.webui.manager": (include_pending_inputs,),
    "llamafactory.webui.runner": (add_train_args, add_eval_args),
    "llamafactory.webui.chatter": (load_edit_chat, show_edited_image),
    "llamafactory.webui.interface": (wrap_train_tab, wrap_eval_tab, wrap_infer_tab),
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
        # A justified catch-all (with `_bootstrap._patches`, the only ones): hooks run inside the host's own
        # `import llamafactory.*`, so anything escaping here would make that import fail and break stock LLaMA-Factory
        # for everyone in this environment. The error is reported on stderr and recorded; settings of ours then refuse
        # to run with it (see report_failed_hooks).
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
