"""Text side of CLIP: tokenizers that turn captions into fixed-length id rows, and a small causal
Transformer that maps those rows to one vector per caption."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import Tensor, nn

from .errors import UserError, check, positive

TOKENIZERS = ("bytes", "clip_bpe")


class _Tokenizer:
    """Shared row layout: [sot, ids..., eot, 0, 0, ...], the layout open_clip.tokenize produces."""

    pad = 0
    sot: int
    eot: int

    def ids(self, text: str) -> list[int]:
        """One caption's ids (what flat_ids lays out, unless a tokenizer lays out its own)."""
        raise NotImplementedError

    def flat_ids(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(every caption's ids one after another, each caption's count)."""
        seqs = [self.ids(t) for t in texts]
        return np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64), np.array([len(q) for q in seqs])

    def encode(self, texts: list[str], context_length: int) -> tuple[Tensor, int]:
        """Rows of shape (len(texts), context_length) and how many captions were cut to fit."""
        positive("text_encoder.context_length", context_length, integer=True, minimum=2, strict=False)
        if isinstance(texts, str):  # a bare string would otherwise be read as one caption per character
            texts = [texts]
        rows = np.full((len(texts), context_length), self.pad, dtype=np.int64)
        room, truncated = context_length - 2, 0
        # the layout in array operations, a block of captions at a time: a pairs file's millions of
        # captions are laid out in seconds, and the temporaries stay a block's size
        for first in range(0, len(texts), 1 << 13):
            flat, lengths = self.flat_ids(texts[first : first + (1 << 13)])
            block = rows[first : first + len(lengths)]
            # keep eot as the last token of a cut caption: the text tower reads the caption's summary there
            keep = np.minimum(lengths, room)
            truncated += int((lengths > room).sum())
            starts = np.cumsum(lengths) - lengths
            at = np.arange(room)[None, :]
            if len(flat):  # gather every slot (clipped into range), then pad the slots past each caption
                picked = flat[np.minimum(starts[:, None] + at, len(flat) - 1)]
                block[:, 1 : context_length - 1] = np.where(at < keep[:, None], picked, self.pad)
            block[:, 0] = self.sot
            block[np.arange(len(keep)), keep + 1] = self.eot
        return torch.from_numpy(rows), truncated

    def __call__(self, texts: list[str], context_length: int) -> Tensor:
        return self.encode(texts, context_length)[0]


class ByteTokenizer(_Tokenizer):
    """UTF-8 bytes shifted past the three special ids: no vocabulary file, and every language (or
    emoji) is representable, at the cost of ~3 ids per CJK character."""

    name = "bytes"
    sot = 1
    eot = 2
    vocab_size = 256 + 3

    def __init__(self, lowercase: bool = False):
        # lowercase: "Dress" and "dress" one caption, as CLIP's BPE (which lowercases) reads them; str.lower
        # knows every script's cases and leaves scripts without case (Chinese) as they are
        self.lowercase = lowercase

    def flat_ids(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        data = [(t.lower() if self.lowercase else t).encode("utf-8") for t in texts]
        flat = np.frombuffer(b"".join(data), dtype=np.uint8).astype(np.int64) + 3
        return flat, np.fromiter(map(len, data), dtype=np.int64, count=len(data))


class BPETokenizer(_Tokenizer):
    """CLIP's own byte-pair vocabulary (via open_clip), so ids match OpenAI / open_clip checkpoints."""

    name = "clip_bpe"
    lowercase = True  # the vocabulary is lowercase: open_clip's SimpleTokenizer lowercases every caption

    def __init__(self):
        try:
            from open_clip.tokenizer import SimpleTokenizer
        except ImportError:  # an optional extra: the bytes tokenizer needs nothing beyond torch
            raise UserError("text_encoder.tokenizer=clip_bpe needs open_clip: pip install "
                            "'contrastive-cli[clip]' (or use text_encoder.tokenizer=bytes)") from None
        self.bpe = SimpleTokenizer()
        self.vocab_size = len(self.bpe.encoder)
        self.sot = self.bpe.encoder["<start_of_text>"]
        self.eot = self.bpe.encoder["<end_of_text>"]

    def ids(self, text: str) -> list[int]:
        return self.bpe.encode(text)


def make_tokenizer(name: str, lowercase: bool = False) -> ByteTokenizer | BPETokenizer:
    if name == "bytes":
        return ByteTokenizer(lowercase)
    if name == "clip_bpe":
        return BPETokenizer()
    raise UserError(f"text_encoder.tokenizer={name}: choose from {', '.join(TOKENIZERS)}")


class TextTransformer(nn.Module):
    """CLIP's text tower: token + learned position embeddings, pre-LayerNorm causal blocks, the
    hidden state at end-of-text, and a bias-free projection to the shared embedding space."""

    def __init__(self, tokenizer: str = "bytes", context_length: int = 64, width: int = 128,
                 layers: int = 3, heads: int = 4, embed_dim: int = 128, lowercase: bool = False):
        super().__init__()
        positive("text_encoder.context_length", context_length, integer=True, minimum=3, strict=False)
        positive("text_encoder.width", width, integer=True)
        positive("text_encoder.layers", layers, integer=True)
        positive("text_encoder.heads", heads, integer=True)
        positive("text_encoder.embed_dim", embed_dim, integer=True)
        check(width % heads == 0,
              f"text_encoder.width={width}: must be a multiple of text_encoder.heads={heads}")
        # lowercase defaults to False here so that a checkpoint written before the setting existed
        # tokenizes as it was trained; the config group's default is true
        self.tokenizer = make_tokenizer(tokenizer, bool(lowercase))
        self.context_length = context_length
        self.feature_dim = embed_dim
        self.token_embedding = nn.Embedding(self.tokenizer.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        # CLIP's initial scales: small embeddings leave the residual stream to the blocks at first
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.ln_final = nn.LayerNorm(width)
        self.projection = nn.Linear(width, embed_dim, bias=False)

    def tokenize(self, texts: list[str]) -> Tensor:
        return self.tokenizer.encode(texts, self.context_length)[0]

    def forward(self, tokens: Tensor, trim: bool = True) -> Tensor:
        n, length = tokens.shape
        if length > self.context_length:
            raise ValueError(f"tokens have {length} positions; this text encoder holds "
                             f"context_length={self.context_length}")
        # the first eot per row: with causal attention it has read the whole caption and no padding;
        # argmax over ids would only find it for clip_bpe, where eot happens to be the largest id
        end = (tokens == self.tokenizer.eot).int().argmax(dim=1)
        # the positions after the batch's longest caption are padding that no eot reads: not computed
        # (a caption of 40 bytes in a context of 64 costs 40 positions, not 64)
        if trim:  # not in an exported graph, which would keep one batch's length as a constant
            tokens = tokens[:, : int(end.max()) + 1]
        length = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        # True above the diagonal: no position sees later ones, so padding after eot cannot reach it
        mask = torch.ones(length, length, dtype=torch.bool, device=tokens.device).triu(1)
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        x = self.ln_final(x)
        return self.projection(x[torch.arange(n, device=tokens.device), end])
