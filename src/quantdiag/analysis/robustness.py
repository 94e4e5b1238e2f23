"""Robustness accuracy (docs/methods.md, Recall): the paper's instruction-wrapped paraphrases,
answered by greedy generation and scored by whether the answer's first line names the object.

The paper scores the immediate completion; a model answers an instruction in its own form (the
built-in SmolLM2 restates the sentence, "The native language of X is French."), so the first
token measures the form, not the fact, and read 0% for every model, the reference included."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import Cache, GenerationConfig, PreTrainedTokenizerBase, StoppingCriteria

from quantdiag.data.facts import Fact
from quantdiag.model.load import LoadedModel

#: Most tokens generated for one answer: 95% of the built-in SmolLM2's first lines fit (docs/methods.md).
ANSWER_TOKENS = 16


@dataclass(frozen=True)
class Paraphrase:
    """One instruction-wrapped paraphrase of fact ``fact`` (an index into the scored facts): its
    token ids, in the tokenizer's chat template when it has one."""

    fact: int
    ids: tuple[int, ...]


def paraphrase_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[int, ...]:
    """``text`` as a user turn of the tokenizer's chat template (an instruction-tuned model is
    asked as it was trained), else as plain text (a base model continues it)."""
    if tokenizer.chat_template:
        turn = [{"role": "user", "content": text}]
        return tuple(tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=True, return_dict=False))
    return tuple(tokenizer(text)["input_ids"])


def first_line(answer: str) -> str:
    """The answer's first non-blank line: what it says before it goes on to something else."""
    return next((line for line in answer.splitlines() if line.strip()), "")


def names_object(answer: str, fact: Fact) -> bool:
    """Whether the answer's first line names the object as a whole word (any case), once the
    subject is taken out of it (a restated "Adobe GoLive" does not name "Adobe")."""
    line = re.sub(re.escape(fact.subject), " ", first_line(answer), flags=re.IGNORECASE)
    return re.search(rf"(?<!\w){re.escape(fact.object)}(?!\w)", line, flags=re.IGNORECASE) is not None


class FirstLineDone(StoppingCriteria):
    """Stops a row once its answer (the tokens after ``prompt_length``) has a finished first line."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_length: int):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        answers = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        done = [bool(re.search(r"\S[^\n]*\n", answer)) for answer in answers]
        return torch.tensor(done, device=input_ids.device)


@torch.inference_mode()
def greedy_answers(
    loaded: LoadedModel, paraphrases: Sequence[Paraphrase], batch_size: int, desc: str = "answering"
) -> list[str]:
    """Each paraphrase's greedy answer (at most ``ANSWER_TOKENS`` tokens, to its end of turn or its
    first finished line), in batches of similar length. The tokens every paraphrase opens with
    (the chat template's system turn, the instruction) run once; each batch continues from their
    cached keys and values, padded between them and its own tokens."""
    if not paraphrases:
        return []
    tokenizer, model, device = loaded.tokenizer, loaded.model, loaded.device
    config = answer_config(loaded)
    pad = config.pad_token_id
    prefix = shared_prefix([p.ids for p in paraphrases])
    opened = model(input_ids=torch.tensor([prefix], device=device), use_cache=True).past_key_values if prefix else None
    order = sorted(range(len(paraphrases)), key=lambda i: len(paraphrases[i].ids))
    answers = [""] * len(paraphrases)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        batch = order[start : start + batch_size]
        ids, mask = _padded_after(prefix, [paraphrases[i].ids[len(prefix) :] for i in batch], pad, device)
        stop = [FirstLineDone(tokenizer, ids.shape[1])]
        cache = _repeated(opened, len(batch))
        out = model.generate(ids, config, stopping_criteria=stop, attention_mask=mask, past_key_values=cache)
        for i, row in zip(batch, tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)):
            answers[i] = row
    return answers


def answer_config(loaded: LoadedModel) -> GenerationConfig:
    """Greedy, at most ``ANSWER_TOKENS`` tokens, to the model's end of turn; padding with the
    tokenizer's pad token (its end-of-text token where it has none)."""
    tokenizer = loaded.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = loaded.model.generation_config.eos_token_id
    return GenerationConfig(max_new_tokens=ANSWER_TOKENS, do_sample=False, pad_token_id=pad, eos_token_id=eos)


def shared_prefix(rows: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    """The tokens every row opens with, short of each row's last token (a row must keep one token
    to run, whose logits start its answer)."""
    shortest = min(len(row) for row in rows) - 1
    length = 0
    while length < shortest and all(row[length] == rows[0][length] for row in rows):
        length += 1
    return rows[0][:length]


def robustness_correct(
    loaded: LoadedModel, paraphrases: Sequence[Paraphrase], facts: Sequence[Fact], batch_size: int, desc: str
) -> np.ndarray:
    """Per paraphrase, whether the model's greedy answer names its fact's object (``names_object``)."""
    answers = greedy_answers(loaded, paraphrases, batch_size, desc)
    return np.array([names_object(a, facts[p.fact]) for a, p in zip(answers, paraphrases)], dtype=bool)


def _repeated(cache: Cache | None, rows: int) -> Cache | None:
    """A copy of the prefix's ``cache`` for ``rows`` rows (generation extends the one it is given)."""
    if cache is None:
        return None
    copied = copy.deepcopy(cache)
    copied.batch_repeat_interleave(rows)
    return copied


def _padded_after(
    prefix: tuple[int, ...], rows: list[tuple[int, ...]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``prefix`` then each row right-aligned, ``pad`` between, and the attention mask that hides
    the padding (generation takes each token's position from the mask, so no row sees a gap)."""
    width = max(len(row) for row in rows)
    ids = torch.tensor([(*prefix, *(pad,) * (width - len(row)), *row) for row in rows], device=device)
    mask = torch.tensor([[1] * len(prefix) + [0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)
    return ids, mask
