"""Template encoding that writes each image's run of ``<|image_pad|>`` tokens as ids instead of tokenizing it.

The host's Qwen-VL plugin expands ``<image>`` into ``<|vision_start|>`` + ``<|image_pad|>`` x N + ``<|vision_end|>``
(N = the image's token count, ~300-750 for a COCO-size photo) and the template then tokenizes that text: ~1 ms of
tokenizer work per image for N copies of one known id, about 40% of preparing a grounding row. Here every run of the
image token in an element is collapsed to one copy before the host tokenizes the element, and that one id is expanded
back to the run's length in the ids. The expansion happens inside ``Template._convert_elements_to_ids``, i.e. before
any processor truncates to ``cutoff_len``, so truncation and label masking see exactly the ids the host's own encoding
gives.

Why the ids are the same: the image token is an added token, which the tokenizer cuts out of the text before it
normalises and pre-tokenizes the pieces between (each piece on its own). A run of N copies and a single copy leave the
same pieces around them, so only the number of image ids differs, and that is put back. Where the token is not cut out
atomically (e.g. ``split_special_tokens``), the collapsed text has a different count of image ids than it had runs,
and the element is encoded the host's way instead. tests/test_fast_tokenize.py compares both encodings end to end.

Each text element goes to the Rust tokenizer directly, with a memo of exact texts (the system message repeats on every
row): see text_ids.py.
"""

from __future__ import annotations

import functools
import re

from typing_extensions import override

from llamafactory_vision.grounding.text_ids import DirectTextEncoder


@functools.cache
def _run_pattern(token: str) -> re.Pattern:
    return re.compile(f"(?:{re.escape(token)})+")


class ImageRunEncoding:
    """Mixin before a host ``Template`` class (see :func:`image_run_template_class`): ``_convert_elements_to_ids``
    with image-token runs inserted as ids. Every other element is encoded by the host's method."""

    @override
    def _convert_elements_to_ids(self, tokenizer, elements) -> list[int]:
        tokenizer = self._text_encoder(tokenizer)
        token = self.mm_plugin.image_token
        if not token or not any(isinstance(element, str) and token in element for element in elements):
            return super()._convert_elements_to_ids(tokenizer, elements)
        pattern, runs, collapsed = _run_pattern(token), [], []
        for element in elements:
            if isinstance(element, str) and token in element:
                runs += [len(run) // len(token) for run in pattern.findall(element)]
                element = pattern.sub(token, element)
            collapsed.append(element)
        ids = super()._convert_elements_to_ids(tokenizer, collapsed)
        token_id = tokenizer.convert_tokens_to_ids(token)
        if ids.count(token_id) != len(runs):  # the token was not encoded as one atomic id per run
            return super()._convert_elements_to_ids(tokenizer, elements)
        expanded, start = [], 0
        for length in runs:
            at = ids.index(token_id, start)
            expanded += ids[start:at]
            expanded += [token_id] * length
            start = at + 1
        expanded += ids[start:]
        return expanded

    def _text_encoder(self, tokenizer) -> DirectTextEncoder:
        """The :class:`DirectTextEncoder` of ``tokenizer``, kept on this template copy (one per prepared dataset) so
        that its memo of encoded texts serves every row."""
        encoder = self.__dict__.get("_direct_text_encoder")
        if encoder is None or encoder.tokenizer is not tokenizer:
            encoder = self._direct_text_encoder = DirectTextEncoder(tokenizer)
        return encoder


@functools.cache
def image_run_template_class(template_class: type) -> type:
    """The host template class ``template_class`` with :class:`ImageRunEncoding` (one subclass per host class, so
    ``Template``, ``ReasoningTemplate`` and the rest each keep their own encoding logic)."""
    return type(f"ImageRun{template_class.__name__}", (ImageRunEncoding, template_class), {})
