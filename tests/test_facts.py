import json
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from typer.testing import CliRunner

from quantdiag.cli import app
from quantdiag.config import RunConfig
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
from quantdiag.model.load import builtin_gguf
from quantdiag.pipeline import build_prompts
from quantdiag.results import _notes
from quantdiag.state import RunContext
from quantdiag.storage import cache_root

from conftest import tiny_tokenizer

#: The shared cache, read before the autouse fixture points QUANTDIAG_CACHE at a test's own folder.
SHARED_CACHE = cache_root()


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
    assert tokenizer.decode(prompt.ids[:end]).endswith(subject)


def _bpe(alphabet: list[str], space: str, pre_tokenizer, rome: str, extra: tuple[str, ...] = (), bos: bool = False):
    """A BPE tokenizer over single characters whose merges spell ``rome``, ⎵is, ⎵France, NET, ⎵(,
    band and ⎵... left to right (⎵ = ``space``, so ⎵. is a token too) and nothing else: digits and
    ⎵' stay single characters, and every case below can be worked out by hand."""
    words = [rome, f"{space}is", f"{space}France", "NET", f"{space}(", "band", f"{space}..."]
    pairs = [(word[:i], word[i]) for word in words for i in range(1, len(word))]
    pairs += [tuple(merge.split(" ")) for merge in extra]
    tokens = dict.fromkeys(["<unk>", "<s>", *alphabet, *(a + b for a, b in pairs)])
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, pairs, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizer
    if bos:
        special = [("<s>", vocab["<s>"])]
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=special)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>")


def _byte_level() -> PreTrainedTokenizerFast:
    """GPT-2 / SmolLM2 style: byte-level pre-tokenizer (Ġ = space), no BOS."""
    return _bpe(pre_tokenizers.ByteLevel.alphabet(), "Ġ", pre_tokenizers.ByteLevel(add_prefix_space=False), "Rome")


def _sentencepiece(*extra_merges: str) -> PreTrainedTokenizerFast:
    """Llama / Gemma style: Metaspace (▁ = space, prepended to the text, not split on) and a BOS."""
    alphabet = [chr(code) for code in range(33, 127)] + ["▁"]
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    return _bpe(alphabet, "▁", metaspace, "▁Rome", extra_merges, bos=True)


def _smollm2() -> PreTrainedTokenizerFast:
    """SmolLM2's own tokenizer from its converted folder in the shared cache; never converts."""
    try:
        stem = builtin_gguf().stem
    except QuantdiagError as exc:
        pytest.skip(str(exc))
    needed = ("config.json", "tokenizer.json")
    folders = [f for f in sorted((SHARED_CACHE / "models").glob(f"{stem}-*")) if all((f / n).is_file() for n in needed)]
    if not folders:
        pytest.skip(f"SmolLM2 not converted yet: no {stem}-* folder with {' and '.join(needed)} in {SHARED_CACHE}")
    return AutoTokenizer.from_pretrained(folders[0])


TOKENIZERS = {"byte-level": _byte_level, "sentencepiece": _sentencepiece, "tiny": tiny_tokenizer, "smollm2": _smollm2}
#: Tokens of the prompt "Rome is" and the subject's span in them.
PROMPTS = {
    "byte-level": (["Rome", "Ġis"], (0, 1)),
    "sentencepiece": (["<s>", "▁Rome", "▁is"], (1, 2)),
    "tiny": (["R", "om", "e", "Ġis"], (0, 3)),
    "smollm2": (["Rome", "Ġis"], (0, 1)),
}
#: (tokenizer, object, the object's leading tokens appended to the prompt, target token).
ANSWERS = [
    ("byte-level", "France", [], "ĠFrance"),
    ("byte-level", "1945", ["Ġ"], "1"),
    ("byte-level", ".NET", ["Ġ."], "NET"),
    ("byte-level", "'s-Hertogenbosch", ["Ġ", "'"], "s"),
    ("byte-level", "(band)", ["Ġ("], "band"),
    ("byte-level", "Łódź", ["Ġ"], "Å"),  # Ł is bytes C5 81: the target is the token of its first byte
    ("sentencepiece", "France", [], "▁France"),
    ("sentencepiece", "1945", ["▁"], "1"),
    ("sentencepiece", ".NET", ["▁."], "NET"),
    ("sentencepiece", "'s-Hertogenbosch", ["▁", "'"], "s"),
    ("sentencepiece", "(band)", ["▁("], "band"),
    ("tiny", "France", [], "ĠFr"),
    ("tiny", "1945", ["Ġ"], "1"),
    ("tiny", ".NET", ["Ġ", "."], "N"),
    ("tiny", "'s-Hertogenbosch", ["Ġ", "'"], "s"),
    ("tiny", "(band)", ["Ġ", "("], "b"),
    ("smollm2", "France", [], "ĠFrance"),
    ("smollm2", "1945", ["Ġ"], "1"),
    ("smollm2", ".NET", ["Ġ."], "NET"),
    ("smollm2", "'s-Hertogenbosch", ["Ġ'"], "s"),
    ("smollm2", "(band)", ["Ġ("], "band"),
]


@pytest.mark.parametrize(("name", "obj", "lead", "target"), ANSWERS)
def test_the_target_is_the_objects_first_content_token(name, obj, lead, target):
    """Leading whitespace/punctuation tokens of " " + object join the prompt; the subject span stays."""
    tokenizer = TOKENIZERS[name]()
    prompt = tokenize(tokenizer, Fact("user", "Rome", obj, "[X] is [Y]."), 0)
    tokens, subject = PROMPTS[name]
    assert tokenizer.convert_ids_to_tokens(list(prompt.ids)) == tokens + lead
    assert tokenizer.convert_ids_to_tokens(prompt.target) == target
    assert prompt.subject == subject


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@pytest.mark.parametrize("obj", ["...", "?!", " ", ""])
def test_an_object_without_a_letter_or_digit_has_no_target(name, obj):
    assert tokenize(TOKENIZERS[name](), Fact("user", "Rome", obj, "[X] is [Y]."), 0) is None


def test_an_object_merged_into_the_prompts_last_token_is_tokenized_alone():
    """With a merge across the word boundary ("▁is" + "▁"), the prompt's tokens do not start the
    tokens of prompt + " 1945"; the answer's tokens are those of " 1945" alone."""
    tokenizer = _sentencepiece("▁is ▁")
    assert tokenizer.tokenize("Rome is 1945") == ["▁Rome", "▁is▁", "1", "9", "4", "5"]
    prompt = tokenize(tokenizer, Fact("user", "Rome", "1945", "[X] is [Y]."), 0)
    assert tokenizer.convert_ids_to_tokens(list(prompt.ids)) == ["<s>", "▁Rome", "▁is", "▁"]
    assert tokenizer.convert_ids_to_tokens(prompt.target) == "1"


SIZES = RunConfig(robustness_facts=5, max_paraphrases=1)


def test_facts_without_a_target_are_dropped_and_counted():
    tokenizer = tiny_tokenizer()
    facts = [Fact("user", "Rome", obj, "[X] is [Y].") for obj in ("Italy", "...", "1945")]
    prompts = build_prompts(SimpleNamespace(tokenizer=tokenizer), facts, SIZES)
    assert (prompts.facts, prompts.dropped) == ([facts[0], facts[2]], 1)
    assert [p.fact for p in prompts.primary] == [0, 1]
    assert [p.fact for p in prompts.robustness] == [0, 1]
    wrapped = tokenizer.decode(prompts.robustness[1].ids)  # no chat template: the wrapper as plain text
    assert wrapped == robustness_texts(facts[2], 1)[0] and wrapped.endswith("The missing word is:")
    assert "Facts not scored: 1 (" in _notes(RunContext(None, None, None, prompts, RunConfig()), [])[-1]


def test_facts_none_of_which_has_a_target_are_a_user_error():
    facts = [Fact("user", "Rome", obj, "[X] is [Y].") for obj in ("...", "?!")]
    with pytest.raises(QuantdiagError, match="none of the 2 facts can be scored"):
        build_prompts(SimpleNamespace(tokenizer=tiny_tokenizer()), facts, SIZES)


def test_robustness_texts_wrap_each_paraphrase_as_a_cloze():
    fact = Fact("P36", "France", "Paris", primary_template("P36"))
    texts = robustness_texts(fact, max_paraphrases=3)
    assert len(texts) == 3
    prefix = ROBUSTNESS_WRAPPER.split("{cloze}")[0]
    assert all(t.startswith(prefix) and "___" in t and "France" in t and "Paris" not in t for t in texts)


ROW = {"subject": "Rome", "object": "Italy", "template": "[X] is the capital of [Y]."}


def _line(**changes) -> str:
    return json.dumps(ROW | changes, ensure_ascii=False)


def test_user_facts_file(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text(_line(subject="Marie Curie", object="Warsaw", template="[X] was born in") + "\n\n" + _line() + "\n")
    facts = load_user_facts(path)
    assert [f.text for f in facts] == ["Marie Curie was born in", "Rome is the capital of"]


def test_a_byte_order_mark_is_read_past(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text(_line() + "\n", encoding="utf-8-sig")
    assert load_user_facts(path) == [Fact("user", "Rome", "Italy", ROW["template"])]


def test_a_line_separator_inside_a_json_string_does_not_end_the_line(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text(_line(object="Ita\u2028ly") + "\n", encoding="utf-8")
    assert [f.object for f in load_user_facts(path)] == ["Ita\u2028ly"]


def _assert_one_error_line(path, expected_start: str, fragment: str) -> None:
    """``quantdiag run`` on the facts file stops before the model (a missing one) with one line."""
    model, out = path.parent / "no-model", path.parent / "run"
    result = CliRunner().invoke(app, ["run", "--facts-file", str(path), "--model", str(model), "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"quantdiag: error: {expected_start}"), result.stderr
    assert fragment in lines[0]


@pytest.mark.parametrize(
    ("second_line", "fragment"),
    [
        ("{broken", "need JSON"),
        ("[1, 2]", "need JSON"),
        ('"x"', "need JSON"),
        (json.dumps({"subject": "Rome", "object": "Italy"}), "need JSON"),
        (_line(subject=""), "empty subject"),
        (_line(object="  "), "empty object"),
        (_line(subject=None), "must be strings"),
        (_line(template="Rome is nice"), "needs [X]"),
        (_line(template="[Y] is the capital of [X]."), "[Y] must occur once, at the template's end"),
        (_line(template="[X] is [Y] or [Y]."), "[Y] must occur once, at the template's end"),
        (_line(template="[X] is [Y]!"), "[Y] must occur once, at the template's end"),
        (_line(subject="Rome ", template="[X][Y]"), "the subject does not occur in the prompt 'Rome'"),
    ],
)
def test_a_bad_facts_line_is_one_error_line_naming_file_and_line(tmp_path, second_line, fragment):
    path = tmp_path / "facts.jsonl"
    path.write_text(_line() + "\n" + second_line + "\n", encoding="utf-8")
    _assert_one_error_line(path, f"{path}:2: ", fragment)


def test_a_facts_file_that_is_not_utf8_is_one_error_line(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_bytes((_line() + "\n" + _line(subject="Zürich") + "\n").encode("latin-1"))
    _assert_one_error_line(path, f"{path}:2: ", "not UTF-8 (byte 0xfc)")


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_an_empty_facts_file_is_a_user_error(tmp_path, content):
    path = tmp_path / "facts.jsonl"
    path.write_text(content)
    with pytest.raises(QuantdiagError, match="is empty"):
        load_user_facts(path)
