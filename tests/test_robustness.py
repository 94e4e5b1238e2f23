"""Robustness accuracy by greedy answers: the batched generation from a shared prefix's cache
against a plain token-by-token loop, the answer's scoring against hand-read answers, and the chat template."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from quantdiag.analysis.robustness import (
    ANSWER_TOKENS,
    Paraphrase,
    greedy_answers,
    names_object,
    paraphrase_ids,
    robustness_correct,
    shared_prefix,
)
from quantdiag.data.facts import Fact, load_pararel, robustness_texts

from conftest import tiny_model, tiny_tokenizer

FRENCH = Fact("P103", "Claude Gensac", "French", "The native language of [X] is [Y].")
ADOBE = Fact("P178", "Adobe GoLive", "Adobe", "[X] is developed by [Y].")


@pytest.mark.parametrize(
    ("answer", "fact", "named"),
    [
        ("The mother tongue of Claude Gensac is French.", FRENCH, True),
        (" 'french'", FRENCH, True),  # any case
        ("\n\n French\nGerman", FRENCH, True),  # blank lines before the first line are skipped
        (" 'the'\n\nFrench", FRENCH, False),  # the object only after the first line
        ("He spoke Frenchified Latin.", FRENCH, False),  # not a whole word
        ('The missing word in the sentence is "Adobe GoLive"', ADOBE, False),  # the subject restated
        ("Adobe GoLive is developed by Adobe.", ADOBE, True),
        ("", FRENCH, False),
    ],
)
def test_an_answer_names_the_object_on_its_first_line_outside_the_subject(answer, fact, named):
    assert names_object(answer, fact) is named


def _hand_greedy(model, tokenizer, ids: tuple[int, ...]) -> str:
    """One prompt, no padding, no cache: the argmax token appended until the end of turn, a
    finished first line, or ANSWER_TOKENS tokens."""
    new: list[int] = []
    for _ in range(ANSWER_TOKENS):
        with torch.no_grad():
            token = int(model(input_ids=torch.tensor([[*ids, *new]])).logits[0, -1].argmax())
        new.append(token)
        text = tokenizer.decode(new, skip_special_tokens=True)
        if token == model.generation_config.eos_token_id or re.search(r"\S[^\n]*\n", text):
            break
    return tokenizer.decode(new, skip_special_tokens=True)


def test_batched_answers_from_the_shared_prefix_equal_a_plain_greedy_loop():
    loaded = tiny_model("llama")
    tokenizer = loaded.tokenizer
    loaded.model.generation_config.eos_token_id = tokenizer.eos_token_id
    newline = tokenizer.convert_tokens_to_ids("Ċ")
    loaded.model.get_output_embeddings().weight.data[newline] *= 6  # some answers end their line early
    facts = load_pararel(["P19", "P36"], 6, 0)
    paraphrases = [
        Paraphrase(i, tuple(tokenizer(text)["input_ids"]))
        for i, fact in enumerate(facts)
        for text in robustness_texts(fact, 1)
    ]
    assert len({len(p.ids) for p in paraphrases}) > 3  # batches mix lengths, so they are padded
    assert len(shared_prefix([p.ids for p in paraphrases])) > 10  # the instruction's opening runs once
    expected = [_hand_greedy(loaded.model, tokenizer, p.ids) for p in paraphrases]
    assert 0 < sum(answer.endswith("\n") for answer in expected) < len(expected)  # both stops are exercised
    assert greedy_answers(loaded, paraphrases, batch_size=4) == expected


def test_the_shared_prefix_leaves_every_row_a_token_to_run():
    assert shared_prefix([(1, 2, 3, 4), (1, 2, 5), (1, 2, 3)]) == (1, 2)
    assert shared_prefix([(1, 2, 3), (1, 2)]) == (1,)  # the shorter row keeps its last token
    assert shared_prefix([(1, 2), (3, 2)]) == ()
    assert shared_prefix([(7, 8, 9)]) == (7, 8)


def test_robustness_correct_scores_each_answer_against_its_own_fact(monkeypatch):
    facts = [FRENCH, ADOBE]
    paraphrases = [Paraphrase(1, (1,)), Paraphrase(0, (2,)), Paraphrase(0, (3,))]
    answers = ["Adobe GoLive is developed by Adobe.", "It is English.", "French."]
    monkeypatch.setattr("quantdiag.analysis.robustness.greedy_answers", lambda *args: answers)
    correct = robustness_correct(None, paraphrases, facts, 8, "robustness")
    np.testing.assert_array_equal(correct, [True, False, True])


CHAT = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def test_a_tokenizer_with_a_chat_template_is_asked_in_a_user_turn():
    tokenizer = tiny_tokenizer()
    text = robustness_texts(FRENCH, 1)[0]
    assert paraphrase_ids(tokenizer, text) == tuple(tokenizer(text)["input_ids"])
    tokenizer.chat_template = CHAT
    expected = tokenizer(f"<s>user: {text}\n<s>assistant:", add_special_tokens=False)["input_ids"]
    assert paraphrase_ids(tokenizer, text) == tuple(expected)
