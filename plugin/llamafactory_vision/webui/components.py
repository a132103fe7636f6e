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

from llamafactory_vision.webui import pictures
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


def add_prediction_gallery(engine: Any, elem_dict: dict[str, Component]) -> dict[str, Component]:
    """After a predict run, a gallery of label (green) / predicted (red) / head (blue) boxes under the metrics."""
    from llamafactory.webui.common import get_save_dir

    manager = engine.manager
    gallery = gr.Gallery(label="Predictions", columns=4, height="auto", visible=False, elem_id="lfv-eval-predictions")
    shown: dict[str, Any] = {}
    top = [manager.get_elem_by_id(f"top.{n}") for n in ("model_name", "finetuning_type", "model_path", "template")]
    names = ("output_dir", "dataset_dir", "dataset", "max_samples", "image_max_pixels", "image_min_pixels")
    inputs = top + [elem_dict[n] for n in names]

    def refresh(model_name, finetuning_type, model_path, template, output_dir, dataset_dir, dataset, max_samples,
                max_pixels, min_pixels):  # fmt: skip
        if engine.runner.running or not (model_name and output_dir and dataset):
            return gr.Gallery()
        out = get_save_dir(model_name, finetuning_type, output_dir)
        predictions = os.path.join(out, pictures.PREDICTIONS)
        if not os.path.isfile(predictions):
            return gr.Gallery(visible=False)
        key = f"{predictions}:{os.path.getmtime(predictions)}"
        if shown.get("key") != key:
            try:
                shown["value"] = pictures.prediction_pictures(
                    out, dataset_dir, dataset, int(max_samples), template, model_path,
                    _pixels(max_pixels), _pixels(min_pixels),
                )  # fmt: skip
            except (OutsideError, TypeError, ValueError, OSError) as err:
                gr.Warning(str(err))
                return gr.Gallery(visible=False)
            shown["key"] = key
        return gr.Gallery(value=shown["value"], visible=bool(shown["value"]))

    elem_dict["output_box"].change(refresh, inputs, [gallery])
    return {"prediction_gallery": gallery}


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


def _descendants(block: Any) -> Iterator[Any]:
    for child in getattr(block, "children", []):
        yield child
        yield from _descendants(child)
