"""Tokenizer loading, VILA's `<image>`-aware prompt tokenization, and streaming detokenization.

The conventions follow VILA's `tokenizer_image_token` (reference doc section 1.6) so the ids we
feed the model are the ids VILA's own code would have produced for the same prompt.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200

# Files from which transformers can build a tokenizer; a folder with none of them is a
# misconfigured checkpoint, and we want to say so before transformers tries the (unreachable) hub.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")

# Pending ids (not yet emitted) beyond which we stop waiting for a clean character boundary and
# emit up to the last one we can find. A genuine incomplete character spans at most 4 byte
# tokens, so this only triggers on malformed byte soup or very long byte-fallback runs; it bounds
# the per-token decode cost.
_MAX_PENDING_TOKENS = 32

_REPLACEMENT_CHAR = "\ufffd"


class TokenizerNotFound(FileNotFoundError):
    """The `llm/` folder has no tokenizer files, or transformers could not load them."""


def load_tokenizer(llm_dir: Path) -> Any:
    """Load the tokenizer saved next to the LLM weights (VILA keeps it in `<root>/llm`).

    transformers v5 always returns the fast (`tokenizers`-backed) implementation; the
    `use_fast=False` that VILA passes no longer has an effect, so we do not pass it.
    """
    from transformers import AutoTokenizer

    llm_dir = Path(llm_dir)
    if not llm_dir.is_dir():
        raise TokenizerNotFound(f"tokenizer folder {llm_dir} does not exist")
    if not any((llm_dir / name).is_file() for name in _TOKENIZER_FILES):
        raise TokenizerNotFound(
            f"no tokenizer in {llm_dir}: expected one of {', '.join(_TOKENIZER_FILES)}"
        )
    try:
        # local_files_only: a local checkpoint must never fall back to a hub lookup.
        return AutoTokenizer.from_pretrained(str(llm_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TokenizerNotFound(f"cannot load the tokenizer in {llm_dir}: {exc}") from exc


def tokenize_with_images(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids for `prompt`, with each `<image>` replaced by one `IMAGE_TOKEN_INDEX`.

    Mirrors VILA: every chunk between placeholders is tokenized on its own *with* special
    tokens (so SentencePiece tokenizers add their prefix space per chunk, exactly as in
    training), then only the first chunk's BOS is kept.
    """
    bos_id = tokenizer.bos_token_id
    chunks = [
        list(tokenizer(chunk, add_special_tokens=True)["input_ids"])
        for chunk in prompt.split(IMAGE_TOKEN)
    ]

    def starts_with_bos(ids: list[int]) -> bool:
        # Only a real leading BOS is stripped: tokenizers without one (Qwen-style) keep all ids,
        # and an empty chunk then contributes nothing at all.
        return bos_id is not None and ids[:1] == [bos_id]

    out: list[int] = [bos_id] if starts_with_bos(chunks[0]) else []
    for index, ids in enumerate(chunks):
        if index:
            out.append(IMAGE_TOKEN_INDEX)
        out.extend(ids[1:] if starts_with_bos(ids) else ids)
    return out


def tokenize_with_image_token(tokenizer: Any, prompt: str, image_token_id: int) -> list[int]:
    """Token ids for `prompt` where `<image>` is a real vocabulary token (NVILA, llava-hf):
    the whole prompt is tokenized at once, as NVILA's and transformers' processors do, and
    each image token then becomes one `IMAGE_TOKEN_INDEX` placeholder, so its id is never embedded
    (NVILA's is past the end of the LLM's embedding table)."""
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    return [IMAGE_TOKEN_INDEX if token == image_token_id else int(token) for token in ids]


def image_token_id(tokenizer: Any, token: str) -> int:
    """The id of `token` when the tokenizer has it as one token; ValueError naming it if not."""
    vocab = tokenizer.get_vocab()
    if token not in vocab:
        raise ValueError(f"the tokenizer has no {token!r} token, which this checkpoint needs")
    return int(vocab[token])


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids that `decode(..., skip_special_tokens=True)` drops."""
    ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    # Added tokens flagged special (e.g. `<|im_end|>`) are skipped by the Rust decoder even when
    # they are not among the named special tokens, so collect them too.
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i, tok in decoder.items() if getattr(tok, "special", False))
    return frozenset(ids)


def stop_token_ids(tokenizer: Any, extra: Iterable[int] = ()) -> frozenset[int]:
    """The tokenizer's end-of-sequence id(s) plus `extra` (template or request stop ids)."""
    ids: set[int] = {int(i) for i in extra}
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, Iterable):
        ids.update(int(i) for i in eos)
    return frozenset(ids)


def byte_fallback_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of the `<0xNN>` tokens of a SentencePiece-style (byte-fallback) tokenizer, else empty.

    Byte-level BPE (GPT-2 / Llama-3 style) has no such tokens: its bytes are ordinary pieces.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not getattr(getattr(backend, "model", None), "byte_fallback", False):
        return frozenset()
    unk = getattr(tokenizer, "unk_token_id", None)
    ids = (tokenizer.convert_tokens_to_ids(f"<0x{byte:02X}>") for byte in range(256))
    return frozenset(int(i) for i in ids if i is not None and i != unk)


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into a stream of text pieces.

    Decoding token by token is wrong for SentencePiece (a lone token loses its leading space)
    and for byte-level BPE (one character may span several tokens). Decoding the whole output
    every step is right but O(n) per token. So, as in TGI and vLLM, we keep two offsets into a
    short window of recent ids: `prefix` marks text already emitted that serves as decoding
    context, `read` the end of what has been emitted. Each push decodes window[prefix:] and
    emits what goes beyond window[prefix:read], unless it ends in U+FFFD, i.e. an incomplete
    character whose remaining bytes are still to come.

    Byte-fallback tokenizers (Llama-2's `<0xNN>` tokens) need one more rule: their decoder turns
    a whole run of byte tokens into U+FFFD per byte as soon as any byte of the run is invalid,
    so a run may only be emitted once a non-byte token has closed it.

    Special tokens are dropped on entry, which is what `skip_special_tokens=True` does to the
    whole sequence, so the pieces concatenate to `tokenizer.decode(ids, skip_special_tokens=True)`.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        # A fast tokenizer's Rust decoder, called directly: the same text as `decode(ids,
        # skip_special_tokens=True, clean_up_tokenization_spaces=False)` without transformers'
        # per-call Python (argument conversion, type checks), which was most of a token's cost
        # on the event loop.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._rust_decode = getattr(backend, "decode", None)
        self._special = special_token_ids(tokenizer)
        self._byte_ids = byte_fallback_ids(tokenizer)
        # Only ids from the prefix offset onwards are kept (the prefix is always index 0), so
        # memory and decode cost stay O(window) however long the generation gets.
        self._window: list[int] = []
        self._read = 0  # index into the window: ids before it have been emitted
        self._emitted = ""  # window[:read] decoded: changes only when the window slides

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is incomplete)."""
        if token_id in self._special:
            return ""
        self._window.append(int(token_id))
        emitted = self._emitted
        if self._window[-1] not in self._byte_ids:
            text = self._decode(self._window)
            if _is_complete(text, emitted):
                return self._advance(len(self._window), text, emitted)
        if len(self._window) - self._read > _MAX_PENDING_TOKENS:
            end = self._last_clean_boundary(emitted)
            return self._advance(end, self._decode(self._window[:end]), emitted)
        return ""

    def flush(self) -> str:
        """Emit whatever is still held back (the stream is over, so nothing more will come)."""
        if self._read == len(self._window):
            return ""
        return self._advance(len(self._window), self._decode(self._window), self._emitted)

    def _last_clean_boundary(self, emitted: str) -> int:
        """The longest pending prefix that ends on a complete character (forced emission)."""
        for end in range(len(self._window) - 1, self._read, -1):
            if _is_complete(self._decode(self._window[:end]), emitted):
                return end
        # Nothing but malformed bytes: they decode to U+FFFD whatever follows.
        return len(self._window)

    def _advance(self, end: int, text: str, emitted: str) -> str:
        """Emit window[read:end] (decoded as `text`) and slide the window forwards."""
        # The ids emitted now become the decoding context of the next step; older ids go.
        read = self._read
        self._window = self._window[read:]
        self._read = end - read
        self._emitted = self._decode(self._window[: self._read])
        return text[len(emitted) :]

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._rust_decode is not None:
            return str(self._rust_decode(ids, skip_special_tokens=True))
        return str(
            self._tokenizer.decode(
                ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        )


def _is_complete(text: str, emitted: str) -> bool:
    """True when `text` adds visible characters to `emitted` and does not end mid-character.

    A decoder renders an incomplete UTF-8 sequence as U+FFFD, so a trailing U+FFFD means "the
    rest of this character is probably still to come". (The empty-growth case covers ids that
    decode to nothing by themselves, like the first half of a byte-level character.)
    """
    return len(text) > len(emitted) and not text.endswith(_REPLACEMENT_CHAR)
