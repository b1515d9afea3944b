"""A byte-level tokenizer that needs no download: token = UTF-8 byte (0..255), 256 = end/pad."""

from __future__ import annotations

import torch


class ByteTokenizer:
    vocab_size = 257
    eos_id = 256

    def encode_batch(self, texts: list[str], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), each [n, seq_len]. Text is truncated, then one EOS, then padding."""
        ids = torch.full((len(texts), seq_len), self.eos_id, dtype=torch.long)
        mask = torch.zeros((len(texts), seq_len), dtype=torch.long)
        for i, t in enumerate(texts):
            b = list(t.encode("utf-8")[: seq_len - 1]) + [self.eos_id]
            ids[i, : len(b)] = torch.tensor(b, dtype=torch.long)
            mask[i, : len(b)] = 1
        return ids, mask


class HFTokenizerAdapter:
    """Same interface over a transformers tokenizer (local models bring their own)."""

    def __init__(self, tok):
        self.tok = tok
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self.vocab_size = len(tok)
        self.eos_id = tok.eos_token_id

    def encode_batch(self, texts: list[str], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tok(list(texts), max_length=seq_len, truncation=True, padding="max_length", return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]
