"""A template's text elements encoded by the Rust tokenizer directly, with a memo of exact texts.

The host's ``Template._convert_elements_to_ids`` encodes each string element with
``tokenizer.encode(text, add_special_tokens=False)``. For a fast tokenizer that call is transformers' Python wrapper
(argument resolution, resetting the backend's truncation/padding state, a ``BatchEncoding``) around one call of the
Rust tokenizer: ~95 us a call where the Rust call takes ~45 us, three calls per grounding row. The system message
(and any instruction text rows share) is encoded again for every row.

:class:`DirectTextEncoder` stands in for the tokenizer inside that host method: ``encode`` calls the Rust tokenizer
itself where the wrapper's call provably reduces to that one call, and remembers the ids of each text; everything
else is the tokenizer's own. Why the ids are the same: with ``add_special_tokens=False`` and no padding or truncation
arguments, ``TokenizersBackend.encode`` resolves to "do not pad, do not truncate", removes any padding/truncation set
on the backend, sets the backend's ``encode_special_tokens`` to the tokenizer's ``split_special_tokens``, and returns
``encode_batch([text], add_special_tokens=False)[0].ids``. The direct call is taken only while the backend is already
in exactly that state and the tokenizer class overrides none of those methods; otherwise the wrapper is called (and
puts the state right). ``encode_batch_fast`` is ``encode_batch`` without character offsets, which the ids do not
depend on. tests/test_fast_tokenize.py compares whole prepared datasets with the host's path and each call with
``tokenizer.encode``.
"""

from __future__ import annotations

from transformers.tokenization_utils_tokenizers import TokenizersBackend

# The methods ``TokenizersBackend.encode`` runs through; a tokenizer class overriding any of them keeps the wrapper.
_WRAPPER_METHODS = ("encode", "_encode_plus", "_get_padding_truncation_strategies", "set_truncation_and_padding")
MEMO_KEPT = 4096  # texts remembered per encoder; when full the memo starts afresh (the repeated texts return first)


def wrapper_is_one_backend_call(tokenizer) -> bool:
    """Whether ``tokenizer.encode(text, add_special_tokens=False)`` is the stock ``TokenizersBackend`` path (see the
    module docstring), i.e. one Rust ``encode_batch`` call once the backend's state is right."""
    cls = type(tokenizer)
    return isinstance(tokenizer, TokenizersBackend) and all(
        getattr(cls, name) is getattr(TokenizersBackend, name) for name in _WRAPPER_METHODS
    )


class DirectTextEncoder:
    """``tokenizer`` for the host's ``_convert_elements_to_ids``: ``encode(text, add_special_tokens=False)`` gives
    ``tokenizer.encode(text, add_special_tokens=False)``, from the Rust tokenizer directly and remembered
    per text; every other attribute is the tokenizer's.

    The memo holds for one tokenizer as it is while one dataset is prepared (the fast template copy that owns this
    encoder lives that long): texts are re-encoded if ``split_special_tokens`` changes; a vocabulary changed
    mid-preparation (added tokens) is not detected, as nothing in the host's data preparation changes it.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer if wrapper_is_one_backend_call(tokenizer) else None
        self.memo: dict[str, tuple[int, ...]] = {}
        self.memo_split = tokenizer.split_special_tokens

    def __getattr__(self, name: str):
        tokenizer = self.__dict__.get("tokenizer")
        if tokenizer is None:  # not initialised (e.g. looked up while unpickling): no recursion into this method
            raise AttributeError(name)
        return getattr(tokenizer, name)

    def __reduce__(self):
        # ``datasets`` pickles the processor, and with it the template copy holding this encoder, to fingerprint a
        # ``map`` and to send it to worker processes: a fresh encoder of the same tokenizer, without the memo (a cache)
        return type(self), (self.tokenizer,)

    def encode(self, text, add_special_tokens: bool = True, **kwargs):
        backend, tokenizer = self.backend, self.tokenizer
        if backend is None or add_special_tokens or kwargs or type(text) is not str:
            return tokenizer.encode(text, add_special_tokens=add_special_tokens, **kwargs)
        split = tokenizer.split_special_tokens
        if backend.truncation is not None or backend.padding is not None or backend.encode_special_tokens != split:
            return tokenizer.encode(text, add_special_tokens=False)  # the wrapper resets the backend's state
        if split != self.memo_split:
            self.memo, self.memo_split = {}, split
        ids = self.memo.get(text)
        if ids is None:
            ids = tuple(backend.encode_batch_fast([text], add_special_tokens=False)[0].ids)
            if len(self.memo) >= MEMO_KEPT:
                self.memo = {}
            self.memo[text] = ids
        return list(ids)
