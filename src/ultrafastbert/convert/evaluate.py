"""Quality of a (converted) sentence encoder: STS-B Spearman of cosine similarities.

The metric sentence-transformers reports for all-MiniLM-L6-v2: embed both sentences of every
STS-B pair (the model's pooling), take the cosine, and correlate with the gold scores by rank.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..glue.data import collate
from ..model.converted import base_model_of
from .data import pool_hidden

log = logging.getLogger(__name__)


@torch.no_grad()
def embed_texts(model: Any, tokenizer_dir: Path, texts: Sequence[str], *, pooling: str,
                max_len: int = 128, batch_size: int = 64) -> torch.Tensor:
    """Sentence embeddings ``(N, d)`` float32 of ``texts``, batched by length (less padding)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokenizer.enable_truncation(max_len)
    tokenizer.no_padding()
    encoded = [e.ids for e in tokenizer.encode_batch(list(texts))]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad = int(getattr(model.config, "pad_token_id", 0) or 0)
    out = torch.empty(len(encoded), _width(model))
    encoder = base_model_of(model).eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            picked = order[start:start + batch_size]
            ids, mask = collate([tuple(encoded[i]) for i in picked], pad)
            hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            out[picked] = pool_hidden(hidden, mask, pooling).float()
    return out


def _width(model: Any) -> int:
    config = model.config
    return int(getattr(config, "hidden_size", None) or config.dim)


def sts_spearman(model: Any, tokenizer_dir: Path, glue_dir: str | Path, *,
                 pooling: str = "mean", split: str = "dev", batch_size: int = 64
                 ) -> dict[str, Any]:
    """STS-B ``split`` Spearman x100 of the cosine of pooled embeddings, and the pair count."""
    from ..glue.data import find_task_dir, read_tsv
    from ..glue.metrics import spearman
    from ..glue.tasks import get_task

    task = get_task("STS-B")
    data = read_tsv(find_task_dir(glue_dir, task) / f"{split}.tsv", task, split)
    pairs = [(e.text_a, e.text_b or "") for e in data.examples]
    texts = sorted({t for pair in pairs for t in pair})
    index = {t: i for i, t in enumerate(texts)}
    emb = embed_texts(model, tokenizer_dir, texts, pooling=pooling, batch_size=batch_size)
    a = emb[[index[p[0]] for p in pairs]]
    b = emb[[index[p[1]] for p in pairs]]
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).numpy()
    gold = np.array([float(e.label) for e in data.examples])
    return {"spearman": 100.0 * spearman(cos, gold), "pairs": len(pairs)}
