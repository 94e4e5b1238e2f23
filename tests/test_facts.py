import json

import pytest

from conftest import tiny_tokenizer
from quantdiag.data.facts import (
    ROBUSTNESS_WRAPPER,
    Fact,
    load_pararel,
    load_user_facts,
    pararel_relations,
    primary_template,
    robustness_texts,
    tokenize,
)
from quantdiag.errors import QuantdiagError


def test_pararel_ships_39_relations_with_templates_ending_at_the_object():
    relations = pararel_relations()
    assert len(relations) == 39
    for relation in relations:
        template = primary_template(relation)
        assert template.index("[X]") < template.index("[Y]")
        assert template.rstrip(" .").endswith("[Y]")
    assert primary_template("P19") == "[X] was born in [Y]."
    assert primary_template("P36") == "The capital of [X] is [Y] ."


def test_sampling_is_seeded_and_sized():
    first = load_pararel(["P19", "P36"], 7, seed=3)
    assert len(first) == 14
    assert first == load_pararel(["P19", "P36"], 7, seed=3)
    assert first != load_pararel(["P19", "P36"], 7, seed=4)


def test_unknown_relation_is_a_user_error():
    with pytest.raises(QuantdiagError, match="P9999"):
        load_pararel(["P19", "P9999"], 5, seed=0)


@pytest.mark.parametrize("subject", ["Masovian Voivodeship", "Paris", "Smyth County"])
def test_subject_span_covers_exactly_the_subject(subject):
    tokenizer = tiny_tokenizer()
    fact = Fact("P36", subject, "Warsaw", "The capital of [X] is [Y] .")
    prompt = tokenize(tokenizer, fact, 0)
    assert fact.text == f"The capital of {subject} is"
    start, end = prompt.subject
    assert tokenizer.decode(prompt.ids[start:end]).strip() == subject
    assert prompt.last_subject == end - 1
    assert tokenizer.decode(prompt.ids[: end]).endswith(subject)


def test_target_is_the_first_token_of_space_object():
    tokenizer = tiny_tokenizer()
    fact = Fact("P19", "Allan Peiper", "Alexandra", "[X] was born in [Y].")
    prompt = tokenize(tokenizer, fact, 0)
    expected = tokenizer(fact.text + " Alexandra")["input_ids"][len(prompt.ids)]
    assert prompt.target == expected
    assert tokenizer.decode([prompt.target]).startswith(" ")


def test_robustness_texts_wrap_each_paraphrase_as_a_cloze():
    fact = Fact("P36", "France", "Paris", primary_template("P36"))
    texts = robustness_texts(fact, max_paraphrases=3)
    assert len(texts) == 3
    prefix = ROBUSTNESS_WRAPPER.split("{cloze}")[0]
    assert all(t.startswith(prefix) and "___" in t and "France" in t and "Paris" not in t for t in texts)


def test_user_facts_file(tmp_path):
    path = tmp_path / "facts.jsonl"
    rows = [{"subject": "Marie Curie", "object": "Warsaw", "template": "[X] was born in"}, {"subject": "Rome", "object": "Italy", "template": "[X] is the capital of [Y]."}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    facts = load_user_facts(path)
    assert [f.text for f in facts] == ["Marie Curie was born in", "Rome is the capital of"]


@pytest.mark.parametrize(
    "content",
    ["", "\n\n", "not json\n", '{"subject": "a", "object": "b"}\n', '{"subject": "a", "object": "b", "template": "no placeholder"}\n', '{"subject": "a", "object": "b", "template": "[Y] is [X]"}\n'],
)
def test_bad_user_facts_are_user_errors(tmp_path, content):
    path = tmp_path / "facts.jsonl"
    path.write_text(content)
    with pytest.raises(QuantdiagError):
        load_user_facts(path)
