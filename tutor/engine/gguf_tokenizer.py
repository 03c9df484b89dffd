"""A GGUF file's byte-level BPE tokenizer, built from its vocabulary and merges as
transformers' ``integrations.gguf.gguf_tokenizer_mapping`` builds it, with the control tokens
as special tokens (``gguf_convert.fast_path_problem`` says which files this covers)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tutor.engine.gguf_reader import GGUFFile

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: every byte as a printable character (transformers' bytes_to_unicode)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def build_tokenizer(gguf: GGUFFile) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer from the file's vocabulary, as transformers builds it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    meta = gguf.metadata
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    token_types: list[int] = meta.get("tokenizer.ggml.token_type") or []
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    backend = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # GPT2Tokenizer's default unk/bos/eos, then the file's control tokens (spelled in the byte
    # alphabet: others are llama.cpp mislabels) as special, its user-defined ones as plain added.
    backend.add_special_tokens([AddedToken("<|endoftext|>", normalized=False, special=True)])
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, token_types, strict=False)
        if kind == _CONTROL and set(token) <= alphabet
    ]
    if control:
        backend.add_special_tokens(control)
    user_defined = [
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(tokens, token_types, strict=False)
        if kind == _USER_DEFINED and token in vocab
    ]
    if user_defined:
        backend.add_tokens(user_defined)

    def special(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None else None

    options: dict[str, Any] = {
        "bos_token": special("bos_token_id"),
        "eos_token": special("eos_token_id"),
        "unk_token": special("unknown_token_id"),
        "pad_token": special("padding_token_id"),
    }
    for key, name in (
        ("tokenizer.chat_template", "chat_template"),
        ("tokenizer.ggml.add_bos_token", "add_bos_token"),
        ("tokenizer.ggml.add_eos_token", "add_eos_token"),
    ):
        if key in meta:
            options[name] = meta[key]
    return PreTrainedTokenizerFast(tokenizer_object=backend, **options)
