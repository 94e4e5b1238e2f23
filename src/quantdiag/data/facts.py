"""Facts and prompts: ParaRel (shipped with the package) or a user's JSONL, turned into token ids
with the subject's token span and the target token (docs/methods.md, Recall)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from quantdiag.errors import QuantdiagError

ROBUSTNESS_WRAPPER = (
    "Based on your knowledge, complete the following sentence by filling in the blank: '{cloze}' The missing word is:"
)
#: The paper's primary templates (Table 3) where ParaRel's own first end-[Y] pattern differs.
PAPER_TEMPLATES = {"P106": "The profession of [X] is [Y]."}
_PARAREL = files("quantdiag") / "data" / "pararel"


@dataclass(frozen=True)
class Fact:
    """A subject-relation-object triple with its primary template (``[X]`` then ``[Y]`` at the end)."""

    relation: str
    subject: str
    object: str
    template: str

    @property
    def text(self) -> str:
        """The primary prompt: the template with the subject, cut where the object goes."""
        return self.template.split("[Y]")[0].replace("[X]", self.subject).rstrip()


@dataclass(frozen=True)
class Prompt:
    """A tokenized prompt: ``ids``, the target token, and the subject's token span [start, end)."""

    fact: int
    ids: tuple[int, ...]
    target: int
    subject: tuple[int, int]

    @property
    def last_subject(self) -> int:
        return self.subject[1] - 1


def pararel_relations() -> list[str]:
    """ParaRel's relations that have paraphrase patterns (39)."""
    return sorted(entry.name.removesuffix(".jsonl") for entry in (_PARAREL / "patterns").iterdir())


@cache
def paraphrases(relation: str) -> tuple[str, ...]:
    """Every ParaRel pattern of ``relation``, with ``[X]`` and ``[Y]``."""
    lines = (_PARAREL / "patterns" / f"{relation}.jsonl").read_text().splitlines()
    return tuple(json.loads(line)["pattern"] for line in lines if line.strip())


def primary_template(relation: str) -> str:
    """The paper's template, else ParaRel's first pattern with the subject first and ``[Y]`` last."""
    if relation in PAPER_TEMPLATES:
        return PAPER_TEMPLATES[relation]
    for pattern in paraphrases(relation):
        if pattern.rstrip(" .").endswith("[Y]") and pattern.index("[X]") < pattern.index("[Y]"):
            return pattern
    raise QuantdiagError(f"relation {relation} has no template ending with the object")


def load_pararel(relations: list[str] | None, per_relation: int | None, seed: int) -> list[Fact]:
    """A seeded sample of ``per_relation`` facts of each relation (``None``: all of them)."""
    known = pararel_relations()
    chosen = relations or known
    unknown = [r for r in chosen if r not in known]
    if unknown:
        raise QuantdiagError(f"unknown relation id {', '.join(unknown)} (ParaRel has {', '.join(known)})")
    facts: list[Fact] = []
    for relation in chosen:
        rows = [
            json.loads(line) for line in (_PARAREL / "facts" / f"{relation}.jsonl").read_text().splitlines() if line
        ]
        if per_relation is not None and per_relation < len(rows):
            rows = random.Random(f"{seed}-{relation}").sample(rows, per_relation)
        template = primary_template(relation)
        facts += [Fact(relation, row["sub_label"], row["obj_label"], template) for row in rows]
    return facts


def load_user_facts(path: Path) -> list[Fact]:
    """JSONL with ``subject``, ``object`` and ``template`` (containing ``[X]``; ``[Y]`` optional,
    at the end) a line; ``relation`` optional. UTF-8, a byte-order mark allowed."""
    if not path.is_file():
        raise QuantdiagError(f"facts file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise QuantdiagError(f"{path}:{line}: not UTF-8 (byte {raw[exc.start]:#04x}); save the file as UTF-8") from None
    lines = enumerate(text.split("\n"), start=1)  # not splitlines(): JSON strings may hold U+2028
    facts = [_user_fact(line, f"{path}:{number}") for number, line in lines if line.strip()]
    if not facts:
        raise QuantdiagError(f"facts file {path} is empty")
    return facts


def _user_fact(line: str, where: str) -> Fact:
    """One line of a facts file as a Fact; ``where`` (file:line) leads every error message."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        row = None
    if not isinstance(row, dict) or not {"subject", "object", "template"} <= row.keys():
        raise QuantdiagError(f"{where}: need JSON: an object with subject, object and template")
    fields = [row[key] for key in ("subject", "object", "template")]
    if not all(isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)) for v in fields):
        raise QuantdiagError(f"{where}: subject, object and template must be strings or whole numbers")
    subject, obj, template = map(str, fields)
    if not subject.strip() or not obj.strip():
        raise QuantdiagError(f"{where}: empty {'subject' if not subject.strip() else 'object'}")
    if "[X]" not in template:
        raise QuantdiagError(f"{where}: the template needs [X] where the subject goes")
    if template.count("[Y]") > 1 or ("[Y]" in template and not template.rstrip(" .").endswith("[Y]")):
        raise QuantdiagError(f"{where}: [Y] must occur once, at the template's end (only spaces or a period after it)")
    template = template if "[Y]" in template else template.rstrip() + " [Y]"
    fact = Fact(str(row.get("relation", "user")), subject, obj, template)
    if subject not in fact.text:
        raise QuantdiagError(f"{where}: the subject does not occur in the prompt '{fact.text}'")
    return fact


def robustness_texts(fact: Fact, max_paraphrases: int | None) -> list[str]:
    """The paper's instruction-wrapped cloze of each paraphrase (docs/methods.md, Recall), answered
    by generation (``analysis.robustness``)."""
    patterns = paraphrases(fact.relation) if fact.relation in pararel_relations() else (fact.template,)
    clozes = [p.replace("[X]", fact.subject).replace("[Y]", "___") for p in patterns[:max_paraphrases]]
    return [ROBUSTNESS_WRAPPER.format(cloze=cloze) for cloze in clozes]


def tokenize(tokenizer: PreTrainedTokenizerBase, fact: Fact, index: int) -> Prompt | None:
    """Token ids of the primary prompt and of the answer's leading tokens, the target token
    (``answer_tokens``) and the subject's token span from the offsets; ``None`` when no target
    can be formed."""
    text = fact.text
    encoded = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    start = text.find(fact.subject)
    end = start + len(fact.subject)
    span = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if start < 0 or not span:
        raise QuantdiagError(f"subject '{fact.subject}' not found in prompt '{text}'")
    answer = answer_tokens(tokenizer, text, ids, fact.object)
    if answer is None:
        return None
    lead, target = answer
    return Prompt(index, (*ids, *lead), target, (span[0], span[-1] + 1))


def answer_tokens(
    tokenizer: PreTrainedTokenizerBase, text: str, ids: list[int], obj: str
) -> tuple[tuple[int, ...], int] | None:
    """The tokens the model must produce to say " " + ``obj`` after ``text`` (its ``ids``), split
    at the first that carries content (a letter or digit): (the whitespace/punctuation tokens
    before it, that target token); ``None`` if no token carries content."""
    source = text + " " + obj
    encoded = tokenizer(source, return_offsets_mapping=True)
    tokens, offsets = encoded["input_ids"][len(ids) :], encoded["offset_mapping"][len(ids) :]
    if encoded["input_ids"][: len(ids)] != ids:  # the object's tokens merged into the prompt's
        source = " " + obj
        encoded = tokenizer(source, add_special_tokens=False, return_offsets_mapping=True)
        tokens, offsets = encoded["input_ids"], encoded["offset_mapping"]
    for position, (a, b) in enumerate(offsets):
        if any(character.isalnum() for character in source[a:b]):
            return tuple(tokens[:position]), tokens[position]
    return None


def target_token(tokenizer: PreTrainedTokenizerBase, text: str, ids: list[int], obj: str) -> int | None:
    """The target token alone (``answer_tokens``), for checking a candidate object."""
    answer = answer_tokens(tokenizer, text, ids, obj)
    return None if answer is None else answer[1]
