"""CLIP tokenizer from a local directory, with CLIP4Clip-style fixed-length batches.

``ClipTokenizer.from_pretrained(dir)`` wraps ``transformers.CLIPTokenizer`` (local files only).
``write_vocab_files(bpe_gz, dir)`` derives ``vocab.json`` + ``merges.txt`` from OpenAI's
``bpe_simple_vocab_16e6.txt.gz`` exactly as OpenAI's ``simple_tokenizer`` builds its
vocabulary, so a tokenizer can be made from that one file.

Batches follow the TS2-Net/UCoFiA data loaders: ``[SOT] + tokens[:L-2] + [EOT]``, padded with
id 0 (not with EOT as Hugging Face pads: the padding tokens' features enter UCoFiA's word
scores, so the pad id matters), ``attention_mask`` 1 on the real tokens.
"""
from __future__ import annotations

import gzip
import json
import os
from typing import Sequence

import torch
from torch import Tensor

SOT, EOT = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map (256 entries)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in chars)))


def openai_vocab(bpe_gz: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(vocab list in id order, merges) as OpenAI's simple_tokenizer builds them: 49408 ids."""
    with gzip.open(bpe_gz, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # line 0 is a version header; OpenAI keeps 49152 - 256 - 2 merges after it
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    base = list(bytes_to_unicode().values())
    vocab = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + [SOT, EOT]
    return vocab, merges


def write_vocab_files(bpe_gz: str, out_dir: str) -> str:
    """Write ``vocab.json`` and ``merges.txt`` (Hugging Face format) into ``out_dir``."""
    vocab, merges = openai_vocab(bpe_gz)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return out_dir


class ClipTokenizer:
    """Fixed-length CLIP tokenisation. ``__call__(texts) -> (input_ids [B, L], attention_mask [B, L])``."""

    def __init__(self, tokenizer, max_length: int = 32):
        if max_length < 3:
            raise ValueError("max_length must be >= 3 (SOT, one token, EOT)")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.sot_id = tokenizer.convert_tokens_to_ids(SOT)
        self.eot_id = tokenizer.convert_tokens_to_ids(EOT)

    @classmethod
    def from_pretrained(cls, path: str, max_length: int = 32) -> "ClipTokenizer":
        from transformers import CLIPTokenizer
        return cls(CLIPTokenizer.from_pretrained(path, local_files_only=True), max_length)

    @classmethod
    def from_bpe(cls, bpe_gz: str, work_dir: str, max_length: int = 32) -> "ClipTokenizer":
        """From OpenAI's merges file; the derived vocabulary files are written to ``work_dir``."""
        return cls.from_pretrained(write_vocab_files(bpe_gz, work_dir), max_length)

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without SOT/EOT and untruncated."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        L = self.max_length
        ids = torch.zeros(len(texts), L, dtype=torch.long)
        mask = torch.zeros(len(texts), L, dtype=torch.long)
        for i, t in enumerate(texts):
            tok = [self.sot_id] + self.encode(t)[: L - 2] + [self.eot_id]
            ids[i, : len(tok)] = torch.tensor(tok)
            mask[i, : len(tok)] = 1
        return ids, mask
