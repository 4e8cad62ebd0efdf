"""Tiny random BERT-family model directories for the conversion tests (built here, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["the", "a", "an", "of", "to", "in", "and", "is", "was", "he", "she", "it", "they", "we", "you", "that", "this", "with", "for", "on", "at", "by", "from", "king", "queen", "man", "woman", "dog", "cat", "house", "tree", "water", "fire", "light", "dark", "good", "bad", "big", "small", "old", "new", "red", "blue", "green", "day", "night", "god", "earth", "heaven", "said", "came", "went", "made", "saw", "love", "hate", "run", "walk", "speak", "word", "book", "river", "sea", "land", "city", "king's"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tokenizer(directory: Path, max_length: int = 64) -> None:
    """A WordPiece tokenizer over :data:`WORDS` with BERT's special tokens and post-processor."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    for ch in "abcdefghijklmnopqrstuvwxyz.,;:'!?":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault("##" + ch, len(vocab))
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=max_length)
    fast.save_pretrained(directory)


def tiny_bert(directory: Path, *, task: str = "base", hidden_act: str = "gelu", seed: int = 0,
              family: str = "bert", sentence_transformers: bool = False) -> Path:
    """Write a tiny random model (2 layers, d=32, FFN 64) of ``family`` and ``task``.

    With ``sentence_transformers`` the layout is sentence-transformers' (model at the root,
    ``modules.json``, mean ``1_Pooling``, ``2_Normalize``).
    """
    import transformers as tf

    directory.mkdir(parents=True, exist_ok=True)
    make_tokenizer(directory)
    vocab = json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]
    torch.manual_seed(seed)
    common = dict(vocab_size=len(vocab), pad_token_id=0)
    if family == "distilbert":
        config = tf.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                     max_position_embeddings=64, activation=hidden_act, **common)
    else:
        cfg_cls = tf.RobertaConfig if family == "roberta" else tf.BertConfig
        config = cfg_cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=66, hidden_act=hidden_act,
                         **common)
    prefix = {"bert": "Bert", "roberta": "Roberta", "distilbert": "DistilBert"}[family]
    suffix = {"base": "Model", "masked-lm": "ForMaskedLM",
              "sequence-classification": "ForSequenceClassification"}[task]
    model = getattr(tf, prefix + suffix)(config)
    with torch.no_grad():  # make the FFNs matter: larger weights than the 0.02 init
        for name, p in model.named_parameters():
            if "intermediate" in name or "output.dense" in name or "ffn" in name:
                p.normal_(0, 0.15)
    model.save_pretrained(directory)
    if sentence_transformers:
        _sentence_transformers_files(directory, dim=32)
    return directory


def _sentence_transformers_files(directory: Path, dim: int) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize"}]
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": dim, "pooling_mode_cls_token": False,
         "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False}))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48}))


def tiny_corpus(path: Path, n_lines: int = 300, seed: int = 0) -> Path:
    """A text file of ``n_lines`` random sentences over :data:`WORDS`."""
    import random

    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) + "."
             for _ in range(n_lines)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
