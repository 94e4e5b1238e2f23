"""Tiny random models of every supported family, and a tiny BPE tokenizer trained on ParaRel
text: unit tests run in seconds and download nothing."""

from __future__ import annotations

import copy
import json
from functools import cache
from importlib.resources import files

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from quantdiag.model.arch import Adapter
from quantdiag.model.load import LoadedModel, weights_fingerprint

FAMILIES = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
    "gemma2": transformers.Gemma2Config,
}
VOCAB = 512


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh copy of the trained tiny tokenizer: a test that adds tokens changes only its own."""
    return copy.deepcopy(_trained_tokenizer())


@cache
def _trained_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on a slice of the packaged ParaRel facts (offsets work like GPT-2's)."""
    root = files("quantdiag") / "data" / "pararel" / "facts"
    text = []
    for relation in ("P19", "P36", "P37", "P103", "P106"):
        for line in (root / f"{relation}.jsonl").read_text().splitlines()[:200]:
            row = json.loads(line)
            text.append(f"{row['sub_label']} was born in {row['obj_label']}. The capital of {row['sub_label']} is")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="<s>", pad_token="<s>")


def tiny_model(family: str, layers: int = 4, seed: int = 0) -> LoadedModel:
    """A random model of ``family`` (hidden 64, intermediate 128, 4 heads, 2 KV heads)."""
    torch.manual_seed(seed)
    config = FAMILIES[family](
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    adapter = Adapter(model)
    return LoadedModel(f"tiny-{family}", model, tiny_tokenizer(), adapter, weights_fingerprint(adapter))


@pytest.fixture(params=sorted(FAMILIES))
def family_model(request) -> LoadedModel:
    return tiny_model(request.param)


@pytest.fixture
def llama() -> LoadedModel:
    return tiny_model("llama")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own quantdiag cache."""
    monkeypatch.setenv("QUANTDIAG_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def one_thread(request):
    """Unit tests run many tiny forwards on one torch thread: several times faster than two
    threads, most of all on cores shared with other processes. End-to-end tests keep all threads."""
    if request.node.get_closest_marker("e2e"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
