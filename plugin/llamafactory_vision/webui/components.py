"""Our gradio components inside LLaMA Board's tabs, built around the host's own tab functions.

The host's tab builders take every input from ``engine.manager.get_base_elems()`` when they wire their buttons.
Our controls are created unrendered first and handed to that call (see :func:`pending_inputs`), so the host's own
preview, start, save and load handlers receive them; then they are rendered into the tab, in one accordion per
capability placed before the tab's button row. Element names (the part after ``train.``/``eval.``) are the YAML
keys, so the host's ``LOCALES`` lookup, its saved LLaMA Board configs and "load arguments" work unchanged.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import gradio as gr

from llamafactory_vision.webui import edit_runs, pictures
from llamafactory_vision.webui.locales import group_tab_name, label_of
from llamafactory_vision.webui.options import Option, to_args, train_options
from llamafactory_vision.webui.safe_paths import OutsideError

if TYPE_CHECKING:
    from gradio.components import Component

PENDING_ATTR = "_llamafactory_vision_pending_inputs"
PREVIEW_ROWS = 4


@contextlib.contextmanager
def pending_inputs(manager: Any, components: Iterable[Component]) -> Iterator[None]:
    """While a host tab is built, ``manager.get_base_elems()`` also returns ``components`` (patched in patches.py)."""
    setattr(manager, PENDING_ATTR, set(components))
    try:
        yield
    finally:
        setattr(manager, PENDING_ATTR, set())


def make_control(option: Option, tab: str) -> Component:
    """An unrendered control for ``option``, labelled in English (the host's language switch relabels it)."""
    common = {
        "label": label_of(option.name),
        "info": option.help,
        "render": False,
        "elem_id": f"lfv-{tab}-{option.name}",
    }
    value = option.to_ui(option.default)
    if option.kind == "checkbox":
        return gr.Checkbox(value=value, **common)
    if option.kind == "dropdown":
        return gr.Dropdown(choices=list(option.choices), value=value, **common)
    if option.kind in ("int", "float") and not option.optional:
        return gr.Number(value=value, precision=0 if option.kind == "int" else None, **common)
    # An optional number is a textbox: empty means unset (None), where gr.Number would send 0
    return gr.Textbox(value="" if value is None else value, **common)


def _render_groups(options: tuple[Option, ...], controls: dict[str, Component], before: Any) -> dict[str, Any]:
    """Render ``controls`` in one closed accordion per capability, placed just before the block ``before``."""
    tabs: dict[str, Any] = {}
    for group in dict.fromkeys(o.group for o in options):
        with gr.Accordion(label=label_of(group), open=False) as tab:
            members = [o for o in options if o.group == group]
            for start in range(0, len(members), 4):  # rows of four, like the host's option rows
                with gr.Row():
                    for option in members[start : start + 4]:
                        controls[option.name].render()
        tabs[group_tab_name(group)] = tab
    _move_before(list(tabs.values()), before)
    return tabs


def _move_before(blocks: list[Any], before: Any) -> None:
    """Move ``blocks`` (just rendered at the end of ``before``'s parent) to sit right before ``before``: gradio lays
    a container's children out in list order, and the host tab has already rendered its buttons and outputs."""
    siblings = before.parent.children
    for block in blocks:
        siblings.remove(block)
    index = siblings.index(before)
    siblings[index:index] = blocks


def _values(data: dict[Component, Any], manager: Any, tab: str, options: tuple[Option, ...]) -> dict[str, Any]:
    return {o.name: data[manager.get_elem_by_id(f"{tab}.{o.name}")] for o in options}


def _pixels(expression: str) -> int:
    from llamafactory.webui.common import calculate_pixels

    return calculate_pixels(expression)


def create_options_tab(
    host_create: Callable, engine: Any, tab: str, extra: dict[str, Component] | None = None
) -> dict:
    """Run a host tab builder (``create_train_tab`` / ``create_eval_tab``) with our option controls as inputs."""
    options = train_options()
    controls = {o.name: make_control(o, tab) for o in options}
    inputs = {**controls, **(extra or {})}
    with pending_inputs(engine.manager, inputs.values()):
        elem_dict = host_create(engine)
    if extra:
        with gr.Row() as extra_row:
            for component in extra.values():
                component.render()
        _move_before([extra_row], elem_dict["cmd_preview_btn"].parent)
    tabs = _render_groups(options, controls, elem_dict["cmd_preview_btn"].parent)
    return {**elem_dict, **inputs, **tabs}


def add_options_to_args(manager: Any, tab: str, data: dict[Component, Any], args: dict[str, Any]) -> dict[str, Any]:
    """Our non-default option values, added to the args the host built for ``tab`` (``train`` or ``eval``)."""
    try:
        ours = to_args(train_options(), _values(data, manager, tab, train_options()))
    except ValueError as err:
        raise gr.Error(str(err)) from err
    return {**args, **ours}


def eval_pixel_controls() -> dict[str, Component]:
    """image_max_pixels / image_min_pixels for predict (named as the host's Train-tab controls: same labels)."""
    return {
        "image_max_pixels": gr.Textbox(value="768*768", render=False),
        "image_min_pixels": gr.Textbox(value="32*32", render=False),
    }


def add_eval_pixels(manager: Any, data: dict[Component, Any], args: dict[str, Any]) -> dict[str, Any]:
    """Predict sees the images at the sizes training used: pass the Evaluate tab's pixel limits (multimodal models)."""
    from llamafactory.webui.common import is_multimodal

    if not is_multimodal(data[manager.get_elem_by_id("top.model_name")]):
        return args
    return {
        **args,
        "image_max_pixels": _pixels(data[manager.get_elem_by_id("eval.image_max_pixels")]),
        "image_min_pixels": _pixels(data[manager.get_elem_by_id("eval.image_min_pixels")]),
    }


def add_grounding_preview(engine: Any, tab: str, elem_dict: dict[str, Component]) -> dict[str, Component]:
    """A "Grounding preview" button and gallery inside the host's dataset preview box."""
    manager = engine.manager
    modal = elem_dict["preview_samples"].parent.parent
    with modal:
        with gr.Row():
            preview_btn = gr.Button(value="Grounding preview")
        with gr.Row():
            gallery = gr.Gallery(
                label="Target boxes", columns=PREVIEW_ROWS, height="auto", visible=False, elem_id=f"lfv-{tab}-preview"
            )
    pixels = ("image_max_pixels", "image_min_pixels")
    inputs = [
        manager.get_elem_by_id("top.model_path"),
        manager.get_elem_by_id("top.template"),
        elem_dict["dataset_dir"],
        elem_dict["dataset"],
        *[elem_dict[name] if name in elem_dict else manager.get_elem_by_id(f"train.{name}") for name in pixels],
    ]

    def show(model_path, template, dataset_dir, dataset, max_pixels, min_pixels):
        if not dataset:
            raise gr.Error("Choose a dataset first.")
        if not model_path:
            raise gr.Error("Choose a model (its processor sets the image size the model sees).")
        try:
            shown = pictures.preview_pictures(
                model_path, template, dataset_dir, dataset[0], _pixels(max_pixels), _pixels(min_pixels), PREVIEW_ROWS
            )
        except (OutsideError, TypeError, ValueError, OSError) as err:
            raise gr.Error(str(err)) from err
        return gr.Gallery(value=shown, visible=True)

    preview_btn.click(show, inputs, [gallery])
    return {"grounding_preview_btn": preview_btn, "grounding_preview": gallery}


GALLERY_TOP = ("model_name", "finetuning_type", "model_path", "template")
GALLERY_EVAL = ("output_dir", "dataset_dir", "dataset", "max_samples", "image_max_pixels", "image_min_pixels")


def _fill_after_predict(engine: Any, elem_dict: dict[str, Component], gallery: Any, build: Callable) -> None:
    """Fill ``gallery`` with ``build(output_dir, values)`` (``values``: the names in :data:`GALLERY_TOP` and
    :data:`GALLERY_EVAL` -> UI value) once a predict run's ``generated_predictions.jsonl`` exists, and again when it
    changes: the host rewrites the output box while it monitors a run and once when the run ends."""
    from llamafactory.webui.common import get_save_dir

    manager = engine.manager
    inputs = [manager.get_elem_by_id(f"top.{n}") for n in GALLERY_TOP] + [elem_dict[n] for n in GALLERY_EVAL]
    shown: dict[str, Any] = {}

    def refresh(*ui_values):
        values = dict(zip(GALLERY_TOP + GALLERY_EVAL, ui_values))
        if engine.runner.running or not (values["model_name"] and values["output_dir"] and values["dataset"]):
            return gr.Gallery()
        out = get_save_dir(values["model_name"], values["finetuning_type"], values["output_dir"])
        predictions = os.path.join(out, pictures.PREDICTIONS)
        if not os.path.isfile(predictions):
            return gr.Gallery(visible=False)
        key = f"{predictions}:{os.path.getmtime(predictions)}:{values['template']}"
        if shown.get("key") != key:
            try:
                shown["value"] = build(out, values)
            except (OutsideError, TypeError, ValueError, OSError) as err:
                gr.Warning(str(err))
                return gr.Gallery(visible=False)
            shown["key"] = key
        return gr.Gallery(value=shown["value"], visible=bool(shown["value"]))

    elem_dict["output_box"].change(refresh, inputs, [gallery])


def add_prediction_gallery(engine: Any, elem_dict: dict[str, Component]) -> dict[str, Component]:
    """After a predict run, a gallery of label (green) / predicted (red) / head (blue) boxes under the metrics."""
    gallery = gr.Gallery(label="Predictions", columns=4, height="auto", visible=False, elem_id="lfv-eval-predictions")

    def build(out: str, v: dict[str, Any]) -> list:
        return pictures.prediction_pictures(
            out, v["dataset_dir"], v["dataset"], int(v["max_samples"]), v["template"], v["model_path"],
            _pixels(v["image_max_pixels"]), _pixels(v["image_min_pixels"]),
        )  # fmt: skip

    _fill_after_predict(engine, elem_dict, gallery, build)
    return {"prediction_gallery": gallery}


def add_edit_gallery(engine: Any, elem_dict: dict[str, Component]) -> dict[str, Component]:
    """After an edit predict run, a gallery of source / output / target, one row of three per example."""
    gallery = gr.Gallery(label="Edits", columns=3, height="auto", visible=False, elem_id="lfv-eval-edits")
    _fill_after_predict(
        engine, elem_dict, gallery, lambda out, v: pictures.edit_pictures(out, v["dataset_dir"], v["template"])
    )
    return {"edit_gallery": gallery}


def add_edit_stage(args: dict[str, Any]) -> dict[str, Any]:
    """The Evaluate tab's args for an edit template: the edit stage with the checkpoint's recorded settings."""
    try:
        return edit_runs.edit_eval_args(args)
    except ValueError as err:
        raise gr.Error(str(err)) from err


def add_answer_boxes(engine: Any, elem_dict: dict[str, Component]) -> dict[str, Component]:
    """In the Chat tab, a grounding answer's boxes drawn on the input image, as the answer streams in."""
    chat_box = elem_dict["chat_box"]
    messages = next(c for c in _descendants(chat_box) if isinstance(c, gr.State))
    with chat_box:
        picture = gr.Image(
            label="Answer boxes", type="pil", interactive=False, visible=False, elem_id="lfv-infer-answer"
        )
    template = engine.manager.get_elem_by_id("top.template")

    def draw(history, image, template_name):
        answer = history[-1]["content"] if history and history[-1].get("role") == "assistant" else ""
        chat_engine = getattr(engine.chatter, "engine", None)
        processor = getattr(chat_engine, "processor", None)
        drawn = pictures.answer_picture(image, answer, template_name, processor) if answer else None
        return gr.Image(value=drawn, visible=drawn is not None)

    messages.change(draw, [messages, elem_dict["image"], template], [picture])
    return {"grounding_answer": picture}


def load_chat_model(host_load: Callable, chatter: Any, data: dict[Component, Any]) -> Iterator[str]:
    """The host's ``WebChatModel.load_model`` for ``data``; an edit template loads with its [IMG] tokens (added to the
    extra-args JSON the host merges) and, once loaded from an edit run's output, is remembered as an edit model."""
    from llamafactory.extras.constants import PEFT_METHODS
    from llamafactory.webui.common import get_save_dir

    manager = chatter.manager
    get = lambda elem_id: data[manager.get_elem_by_id(elem_id)]
    template = get("top.template")
    extra = manager.get_elem_by_id("infer.extra_args")
    yield from host_load(chatter, {**data, extra: edit_runs.with_img_token_args(template, data[extra])})
    if not chatter.loaded:
        return
    model_name, finetuning_type = get("top.model_name"), get("top.finetuning_type")
    checkpoint, model_path, adapters = get("top.checkpoint_path"), get("top.model_path"), None
    if checkpoint and finetuning_type in PEFT_METHODS:  # as the host's load_model builds its args
        adapters = ",".join(str(get_save_dir(model_name, finetuning_type, a)) for a in checkpoint)
    elif checkpoint:
        model_path = str(get_save_dir(model_name, finetuning_type, checkpoint))
    try:
        edit_runs.register_chat_engine(chatter.engine, template, edit_runs.trained_dir(model_path, adapters))
    except ValueError as err:
        gr.Warning(str(err))


def stream_with_edit(host_stream: Callable, chatter: Any, chatbot: list, messages: list, *inputs: Any) -> Iterator:
    """The host's ``WebChatModel.stream``; then, for an edit model, the image edited from the answer joins the chat
    (the conversation state keeps text only). ``inputs``: the host's, from ``lang`` on (the image is the fourth)."""
    last = None
    for last in host_stream(chatter, chatbot, messages, *inputs):
        yield last
    if last is None:
        return
    try:
        edited = edit_runs.chat_edit_image(chatter.engine, inputs[3], last[1])
    except (OSError, ValueError) as err:
        gr.Warning(f"edited image: {err}")
        return
    if edited is not None:
        picture = gr.Image(value=edited, type="pil", format="png", label="Edited image")
        yield last[0] + [{"role": "assistant", "content": picture}], last[1]


def _descendants(block: Any) -> Iterator[Any]:
    for child in getattr(block, "children", []):
        yield child
        yield from _descendants(child)
