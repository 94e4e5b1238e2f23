"""Tiny random models of every supported family, and a tiny BPE tokenizer trained on ParaRel
text: unit tests run in seconds and download nothing."""

from __future__ import annotations

import copy
import json
from functools import cache
from importlib.resources import files
from pathlib import Path

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
    "gemma3_text": transformers.Gemma3TextConfig,
    "phi3": transformers.Phi3Config,
    "olmo2": transformers.Olmo2Config,
    "granite": transformers.GraniteConfig,
    "qwen3_moe": transformers.Qwen3MoeConfig,
}
#: What makes a family's tiny model exercise its peculiarities: a sliding window shorter than the test
#: prompts on alternate layers (the pattern repeats over the layers), Granite's multipliers, four routed
#: experts (two per token).
FAMILY_OPTIONS = {
    "gemma3_text": {"sliding_window": 3, "layer_types": ("sliding_attention", "full_attention")},
    "mistral": {"sliding_window": 3},
    "phi3": {"pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0},
    "olmo2": {"pad_token_id": 0, "eos_token_id": 0},
    "granite": {"residual_multiplier": 2.0, "logits_scaling": 0.5, "embedding_multiplier": 3.0},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
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
    options = dict(FAMILY_OPTIONS.get(family, {}))
    if "layer_types" in options:
        options["layer_types"] = [options["layer_types"][layer % 2] for layer in range(layers)]
    config = FAMILIES[family](
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        **options,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    adapter = Adapter(model)
    return LoadedModel(f"tiny-{family}", model, tiny_tokenizer(), adapter, weights_fingerprint(adapter))


def answer_in_words(loaded: LoadedModel) -> None:
    """Make a tiny model answer with words: its head writes only tokens that start with a space
    and hold two characters more, four times sharper (so facts built from its answers are known)."""
    tokens = loaded.tokenizer.convert_ids_to_tokens(list(range(len(loaded.tokenizer))))
    words = torch.tensor([token.startswith("Ġ") and len(token) > 2 for token in tokens])
    head = loaded.model.get_output_embeddings().weight
    head.data[~words] = 0
    head.data[words] *= 4


def save_model(loaded: LoadedModel, folder: Path) -> Path:
    """``loaded``'s model and tokenizer as a Hugging Face folder (what ``--model`` reads)."""
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def save_noisy(source: Path, target: Path, scale: float, seed: int, chosen=lambda name: "layers" in name) -> None:
    """A float checkpoint in ``target``: the model in ``source`` plus Gaussian noise of ``scale``
    times each chosen 2-D weight's standard deviation, with the tiny tokenizer."""
    model = transformers.AutoModelForCausalLM.from_pretrained(source)
    generator = torch.Generator().manual_seed(seed)
    for name, weight in model.named_parameters():
        if weight.ndim == 2 and chosen(name):
            weight.data += scale * weight.data.std() * torch.randn(weight.shape, generator=generator)
    model.save_pretrained(target)
    tiny_tokenizer().save_pretrained(target)


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
