"""The text tower: tokenizer rows, truncation, open_clip compatibility, eot pooling, and training."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

import contrastive_cli
from contrastive_cli.errors import UserError
from contrastive_cli.text import ByteTokenizer, TextTransformer, make_tokenizer

CAPTIONS = ["一只猫坐在垫子上", "A dog runs on the beach.", "two birds, one tree!"]


def small(**kw) -> TextTransformer:
    torch.manual_seed(0)
    return TextTransformer(**{"context_length": 32, "width": 32, "layers": 2, "heads": 2, "embed_dim": 16, **kw})


@pytest.mark.parametrize("text", ["一只猫坐在垫子上", "A cat sits on a mat."])
def test_bytes_row_layout_and_round_trip(text):
    rows, truncated = ByteTokenizer().encode([text], 64)
    data = text.encode("utf-8")
    expected = [1, *(b + 3 for b in data), 2] + [0] * (64 - len(data) - 2)
    assert rows.dtype == torch.long and rows.tolist() == [expected] and truncated == 0
    assert bytes(i - 3 for i in rows[0, 1 : len(data) + 1].tolist()).decode("utf-8") == text


def test_lowercase_reads_a_capitalised_name_as_the_same_caption():
    on, off = ByteTokenizer(lowercase=True), ByteTokenizer()
    assert on("An Ankle Boot", 32).tolist() == on("an ankle boot", 32).tolist() == off("an ankle boot", 32).tolist()
    assert off("An Ankle Boot", 32).tolist() != off("an ankle boot", 32).tolist()
    assert on("ÉTÉ Σ 一只猫", 32).tolist() == off("été σ 一只猫", 32).tolist()  # any script's cases; none in Chinese
    # a checkpoint from before the setting has no `lowercase` key: it tokenizes as it was trained
    assert not TextTransformer(width=8, layers=1, heads=2).tokenizer.lowercase


def test_many_captions_of_every_length_are_laid_out_as_one_at_a_time():
    # encode lays blocks of captions out at once; each row must be the caption's own row
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(list("ab cé猫"), size=n)) for n in rng.integers(0, 40, size=10_000)]
    tok = ByteTokenizer()
    for length in (2, 3, 16, 64):
        rows, cut = tok.encode(texts, length)
        for i in [*range(300), *range(len(texts) - 300, len(texts))]:  # both ends: the first and the last block
            data = texts[i].encode("utf-8")[: length - 2]
            assert rows[i].tolist() == [1, *(b + 3 for b in data), 2] + [0] * (length - len(data) - 2)
        assert cut == sum(len(t.encode("utf-8")) > length - 2 for t in texts)
        ends = (rows == tok.eot).int().argmax(1)
        assert (ends == torch.tensor([min(len(t.encode("utf-8")), length - 2) + 1 for t in texts])).all()


def test_truncation_keeps_eot_last_and_counts_cut_captions():
    tok = ByteTokenizer()
    rows, truncated = tok.encode(["x" * 200], 16)
    assert rows.shape == (1, 16) and truncated == 1
    assert rows[0, 15] == tok.eot and rows[0, 0] == tok.sot and (rows[0, 1:15] == ord("x") + 3).all()
    rows, truncated = tok.encode(["short", "y" * 200, "z" * 14], 16)
    assert truncated == 1  # "z" * 14 fills the row exactly: sot + 14 + eot, nothing cut
    assert rows[2, 15] == tok.eot and tok("short", 16).shape == (1, 16)


@pytest.mark.parametrize("context_length", [77, 32])
def test_bpe_rows_equal_open_clip(context_length):
    open_clip = pytest.importorskip("open_clip")
    captions = [*CAPTIONS, "A  PHOTO of an Élan   café, 3 cups & 2 spoons :-)"]
    tok = make_tokenizer("clip_bpe")
    rows, truncated = tok.encode(captions, context_length)
    assert torch.equal(rows, open_clip.tokenize(captions, context_length))
    assert (tok.name, tok.vocab_size, tok.pad, truncated) == ("clip_bpe", 49408, 0, 0)
    long = ["a photo of a cat " * 20]  # cut the same way open_clip cuts it: eot in the last slot
    rows, truncated = tok.encode(long, context_length)
    assert torch.equal(rows, open_clip.tokenize(long, context_length)) and truncated == 1
    assert rows[0, -1] == tok.eot


def test_bpe_without_open_clip_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    monkeypatch.setitem(sys.modules, "open_clip.tokenizer", None)
    with pytest.raises(UserError, match=r"tokenizer=clip_bpe needs open_clip.*tokenizer=bytes"):
        make_tokenizer("clip_bpe")


def test_bad_settings_name_the_key_and_what_is_allowed():
    with pytest.raises(UserError) as e:
        make_tokenizer("wordpiece")
    assert "text_encoder.tokenizer=wordpiece" in str(e.value) and "bytes, clip_bpe" in str(e.value)
    with pytest.raises(UserError, match="text_encoder.tokenizer=foo: choose from bytes, clip_bpe"):
        TextTransformer(tokenizer="foo")
    with pytest.raises(UserError, match=r"text_encoder\.width=130: must be a multiple of text_encoder\.heads=4"):
        TextTransformer(width=130, heads=4)
    with pytest.raises(UserError, match=r"text_encoder\.heads=0"):
        TextTransformer(heads=0)
    with pytest.raises(UserError, match=r"text_encoder\.context_length=2"):
        TextTransformer(context_length=2)
    with pytest.raises(UserError, match=r"text_encoder\.layers=1\.5"):
        TextTransformer(layers=1.5)


@pytest.mark.parametrize("train", [True, False])  # eval + no_grad takes PyTorch's fused fast path
def test_output_is_read_at_eot_and_ignores_padding(train):
    model = small().train(train)
    tokens = model.tokenize(CAPTIONS)
    eot = (tokens == 2).int().argmax(1)
    with torch.set_grad_enabled(train):
        out = model(tokens)
        assert out.shape == (3, 16)
        padded = tokens.clone()
        # the largest id after eot: pooling at argmax(ids) or at the last slot would move or see it
        padded[torch.arange(3), eot + 1] = model.tokenizer.vocab_size - 1
        padded[:, -1] = 100
        assert torch.allclose(model(padded), out, atol=1e-6)
        edited = tokens.clone()
        edited[0, 1] += 1  # a byte inside the first caption
        changed = model(edited)
    assert not torch.allclose(changed[0], out[0], atol=1e-4)
    assert torch.allclose(changed[1:], out[1:], atol=1e-6)  # rows do not see each other


def test_truncated_caption_is_read_at_the_last_slot():
    model = small()
    tokens = model.tokenize(["a caption far longer than thirty-two bytes of context"])
    assert tokens[0, -1] == model.tokenizer.eot
    edited = tokens.clone()
    edited[0, -2] += 1  # the last byte kept must still count
    assert not torch.allclose(model(edited), model(tokens), atol=1e-4)


def test_same_seed_same_model_and_bf16_autocast_trains():
    tokens = small().tokenize(CAPTIONS)
    assert torch.equal(small()(tokens), small()(tokens))
    model = small()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens)
    assert out.shape == (3, 16) and torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_contrastive_toy_loss_falls():
    """Eight captions learn to point at eight fixed random vectors: the CLIP loss on one side."""
    model = small()
    captions = ["a red cube", "a blue ball", "ein Hund", "un chat", "一只猫", "two trees", "the sea", "7 apples"]
    tokens = model.tokenize(captions)
    targets = F.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    labels = torch.arange(8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        logits = F.normalize(model(tokens), dim=1) @ targets.T / 0.1
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_config_builds_the_tower_and_leaves_embed_dim_to_the_method():
    path = Path(contrastive_cli.__file__).parent / "configs" / "text_encoder" / "transformer.yaml"
    cfg = OmegaConf.load(path)
    assert "embed_dim" not in cfg and cfg.tokenizer == "bytes" and cfg.lowercase is True
    model = instantiate(cfg, embed_dim=24)
    assert model.tokenizer.lowercase
    assert isinstance(model, TextTransformer) and model.feature_dim == 24
    assert model.context_length == cfg.context_length
    assert model(model.tokenize(CAPTIONS)).shape == (3, 24)
