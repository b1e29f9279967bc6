"""The download-free byte-level tokenizer: token id ``b`` is the byte ``b``.

``"bytes"`` (:data:`BYTES`) is its name wherever a tokenizer source is accepted (``TextDataModule``'s
``tokenizer`` argument).
"""
from __future__ import annotations

BYTES = "bytes"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (ByteLevel's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def byte_tokenizer():
    """A byte-level tokenizer that needs no download: token id ``b`` is the byte ``b`` (0-255).

    Special tokens: ``<|endoftext|>`` (id 256; EOS and BOS) and ``<pad>`` (id 257), so ``len()`` is 258.
    Built with the ``tokenizers`` library (a merge-free BPE over the ByteLevel alphabet) and wrapped in
    transformers' ``PreTrainedTokenizerFast``, so ``save_pretrained`` / ``AutoTokenizer.from_pretrained``
    work and ``decode(encode(text)) == text`` for any UTF-8 text (no prefix space, no clean-up).
    """
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    mapping = _bytes_to_unicode()
    backend = Tokenizer(models.BPE(vocab={mapping[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOS_TOKEN, PAD_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )

