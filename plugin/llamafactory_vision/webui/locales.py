"""English and Chinese labels of our LLaMA Board controls, in the host's ``LOCALES`` shape.

The English label is the YAML key made readable and the info is the field's help text, both read from the argument
dataclasses, so a field added later gets a label without changes here. Chinese labels and info are written here
for the keys we know; a key without one shows its English text. Languages the host offers beyond these (ru, ko, ja)
show the English text.
"""

from __future__ import annotations

from typing import Any

HOST_LANGS = ("en", "ru", "zh", "ko", "ja")

# YAML key -> (Chinese label, Chinese info)
ZH_OPTIONS: dict[str, tuple[str, str]] = {
    "grounding_invalid": (
        "无效定位样本",
        "grounding 数据集中无效行的处理方式：error 报错并指出数据集、行和字段；skip 跳过并按原因计数。",
    ),
    "ground_answer_style": ("定位回答格式", "训练目标中框的书写风格。"),
    "grounding_image_cache": ("图像缓存", "在内存中缓存每张图像预处理后的张量并跨 epoch 复用（每个进程一份，批次结果不变）。"),
    "grounding_image_cache_mib": ("图像缓存上限 (MiB)", "每个进程的图像缓存最多占用的内存，超出时淘汰最久未用的图像。"),
    "bbox_head": ("框回归头", "与语言模型损失联合训练一个框回归头（仅限 grounding 模板）。"),
    "bbox_loss_weight": ("框损失权重", "加到语言模型损失上的框回归头损失的权重。"),
    "bbox_l1_weight": ("L1 权重", "框回归头损失中 L1 项的权重（DETR：5）。"),
    "bbox_giou_weight": ("GIoU 权重", "框回归头损失中 GIoU 项的权重（DETR：2）。"),
    "bbox_fused_loss": ("融合框损失", "将回归头损失（L1 + GIoU）计算为单个自动求导节点（手推反向），数值在浮点舍入范围内一致；需要 bbox_head。"),
    "bbox_head_layers": ("回归头层数", "框回归头 MLP 的线性层数（最后一层零初始化）。"),
    "bbox_head_source": ("回归头输入位置", "回归头读取的隐藏状态：box_start（框的起始符）或 box_end（结束符）。"),
    "diffusion_model_name_or_path": ("扩散模型路径", "Stable Diffusion / InstructPix2Pix 模型的路径或名称。"),
    "edit_resolution": ("编辑分辨率", "编辑训练和推理的图像边长（像素）。"),
    "edit_diffusion_weight": ("扩散损失权重", "加到语言模型损失上的扩散损失权重。"),
    "edit_text_guidance_scale": ("文本引导系数", "推理时的文本无分类器引导系数。"),
    "edit_image_guidance_scale": ("图像引导系数", "推理时的图像无分类器引导系数。"),
}

GROUP_LABELS: dict[str, tuple[str, str]] = {
    "grounding": ("Grounding (llamafactory-vision)", "视觉定位 (llamafactory-vision)"),
    "editing": ("Image editing (llamafactory-vision)", "图像编辑 (llamafactory-vision)"),
    "fusion": ("MG-LLaVA fusion (llamafactory-vision)", "MG-LLaVA 多粒度融合 (llamafactory-vision)"),
    "strokes": ("Draw & Guess (llamafactory-vision)", "涂鸦猜测 (llamafactory-vision)"),
}

# our other components: element name -> {lang: attributes}
FIXED: dict[str, dict[str, dict[str, Any]]] = {
    "grounding_preview_btn": {
        "en": {"value": "Grounding preview"},
        "zh": {"value": "定位预览"},
    },
    "grounding_preview": {
        "en": {"label": "Target boxes as the model sees the image (green)"},
        "zh": {"label": "模型视角下的目标框（绿色）"},
    },
    "prediction_gallery": {
        "en": {"label": "Predictions: label boxes green, predicted red, bbox head blue"},
        "zh": {"label": "预测结果：标注框绿色，预测框红色，回归头蓝色"},
    },
    "edit_gallery": {
        "en": {"label": "Edits: source, output, target"},
        "zh": {"label": "编辑结果：原图、输出、目标"},
    },
    "grounding_answer": {
        "en": {"label": "Answer boxes on the input image"},
        "zh": {"label": "回答中的框（画在输入图像上）"},
    },
}


def _all_langs(per_lang: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The host's ``change_lang`` reads ``LOCALES[name][lang]`` for every language it offers: fill gaps with en."""
    return {lang: per_lang.get(lang, per_lang["en"]) for lang in HOST_LANGS}


def label_of(name: str) -> str:
    return name.replace("_", " ").capitalize()


def group_tab_name(group: str) -> str:
    return f"vision_{group}_tab"


def build_locales(option_helps: dict[str, str], groups: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """``LOCALES`` entries for our options (``{key: help}``), group accordions and fixed components."""
    out = {}
    for name, help_text in option_helps.items():
        en = {"label": label_of(name), "info": help_text}
        zh_label, zh_info = ZH_OPTIONS.get(name, (en["label"], en["info"]))
        out[name] = _all_langs({"en": en, "zh": {"label": zh_label, "info": zh_info}})
    for group in groups:
        en, zh = GROUP_LABELS.get(group, (f"{group.capitalize()} (llamafactory-vision)",) * 2)
        out[group_tab_name(group)] = _all_langs({"en": {"label": en}, "zh": {"label": zh}})
    for name, per_lang in FIXED.items():
        out[name] = _all_langs(per_lang)
    return out
