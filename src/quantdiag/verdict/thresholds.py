"""Every number the verdict depends on, in one place, each with the reason for its value.

docs/verdict.md explains the rules in plain words; change a threshold here and both the verdict
and the report's signature tables follow. The paper (Sections 3-4) describes its 4-bit and 2-bit
models in words and figures, not in numbers these lines could be copied from: each threshold is
a line between the two descriptions, checked on the built-in model's own settings and on the
checkpoints of tests/test_validation.py (docs/verdict.md gives the measured values), and moved by
the noise floor a run measures (``floor_shift``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

#: The paper's three questions (Section 4): is the answer still represented, does the early
#: computation still work, can the damage be localised and repaired without training.
SIGNAL, MECHANISM, INTERVENTION = "signal", "mechanism", "intervention"
QUESTIONS = (SIGNAL, MECHANISM, INTERVENTION)
QUESTION_TITLES = {
    SIGNAL: "Is the answer still represented?",
    MECHANISM: "Does the early computation still work?",
    INTERVENTION: "Is the damage localisable and repairable?",
}
#: The command that measures each question on a finished run (RUN: the run folder).
QUESTION_COMMANDS = {
    SIGNAL: "quantdiag patch RUN --analyses patching",
    MECHANISM: "quantdiag patch RUN --analyses components,representations",
    INTERVENTION: "quantdiag sensitivity RUN and quantdiag repair RUN",
}


@dataclass(frozen=True)
class Signature:
    """One signature of docs/verdict.md: which question it answers, what is measured, where the
    line is, and why there.

    ``collapse_when``: on which side of ``threshold`` the value votes Collapse (the other side
    votes "intact"). ``ideal``: the value of a model identical to the reference; a run's noise
    floor moves the line by the floor's distance from it (``None``: no floor applies).
    ``scale``: "linear" for values in [0, 1], "log" for ranks."""

    name: str
    question: str
    title: str
    measure: str
    threshold: float
    collapse_when: Literal["above", "below"]
    reason: str
    ideal: float | None = None
    scale: Literal["linear", "log"] = "linear"

    @property
    def collapse_side(self) -> str:
        """The sign in "Collapse if": > for values above the threshold, < for below."""
        return ">" if self.collapse_when == "above" else "<"

    def votes_collapse(self, value: float, threshold: float | None = None) -> bool:
        line = self.threshold if threshold is None else threshold
        return value > line if self.collapse_when == "above" else value < line

    def margin(self, value: float, threshold: float | None = None) -> float:
        """How far past the line a value is, signed (+ on the intact side), as a share of the way
        from the line to the end of the scale on its side, in [-1, 1] ([0, 1] scales; for ranks,
        decades over the line's own decades below 1)."""
        line = self.threshold if threshold is None else threshold
        if self.scale == "log":
            distance = math.log10(max(value, 1e-12) / line) / abs(math.log10(line))
        else:
            span = line if value < line else 1 - line
            distance = (value - line) / span if span > 0 else 0.0
        distance = max(-1.0, min(1.0, distance))
        return -distance if self.collapse_when == "above" else distance


SIGNATURES: tuple[Signature, ...] = (
    Signature(
        "lens_rank",
        SIGNAL,
        "Answer signal (logit lens)",
        "best median rank of the answer over the layers, as a share of the vocabulary (chance: 50%)",
        0.02,
        "above",
        "Section 3.3: the 2-bit answer's rank stays in the tens of thousands at every layer, the 4-bit "
        "answer surfaces in mid-to-late layers. 2% of a 128k vocabulary is 2,565; of SmolLM2's 49k, 983.",
        scale="log",
    ),
    Signature(
        "patching",
        SIGNAL,
        "Subject patching",
        "mean restoration by the reference's residual state at the last subject token, first half of the layers",
        0.2,
        "below",
        "Section 3.4: patching the last subject token in early layers restores a 4-bit model; a 2-bit "
        "model is unresponsive to subject patching.",
    ),
    Signature(
        "cka_diagonal",
        MECHANISM,
        "CKA diagonal",
        "mean debiased CKA of each layer with the reference's same layer (residual, last subject token)",
        0.6,
        "below",
        "Section 4.2.1: the 4-bit diagonal stays bright, the 2-bit map is dark. Debiased, so unrelated "
        "representations read 0 at any number of prompts.",
        ideal=1.0,
    ),
    Signature(
        "activation_subspace",
        MECHANISM,
        "Activation subspace",
        "mean similarity of the centred top-k activation subspaces above chance (residual, last subject token)",
        0.4,
        "below",
        "Section 4.2.2: high at 4-bit, near zero at 2-bit. Chance (k/d) is taken out, so small models "
        "with large k/d are judged alike.",
        ideal=1.0,
    ),
    Signature(
        "error_alignment",
        MECHANISM,
        "Error alignment",
        "mean similarity of the error's centred top-k subspace with the reference's, above chance",
        0.5,
        "above",
        "Section 4.2.2: the 2-bit error lies in the signal's directions, the 4-bit error is noise-like.",
        ideal=0.0,
    ),
    Signature(
        "sign_flip",
        MECHANISM,
        "Gate sign flips (SFR)",
        "mean share of gate pre-activations whose sign flips",
        0.25,
        "above",
        "Section 4.1.2: a flipped gate switches a neuron off or on; high at 2-bit, low at 4-bit.",
        ideal=0.0,
    ),
    Signature(
        "jaccard",
        MECHANISM,
        "Neuron overlap (Jaccard)",
        "mean Jaccard overlap of the top-1% FFN neurons with the reference's",
        0.15,
        "below",
        "Section 4.1.2: the 2-bit model activates different neurons; the 4-bit keeps its retrieval overlap.",
        ideal=1.0,
    ),
    Signature(
        "value_cosine",
        MECHANISM,
        "FFN output direction",
        "mean cosine of the FFN output with the reference's",
        0.4,
        "below",
        "Section 4.1.2: near zero at 2-bit (an unrelated vector), high at 4-bit even on failures.",
        ideal=1.0,
    ),
    Signature(
        "focus_divergence",
        MECHANISM,
        "Attention focus (JSD)",
        "mean Jensen-Shannon divergence of the attention at the last subject token from the reference's, early blocks",
        0.1,
        "above",
        "Section 4.1.1: the 2-bit focus divergence surges, the 4-bit follows the reference. Measured in the "
        "early blocks of SmolLM2 (tests/test_validation.py): 0.003 under noise that keeps 81%, 0.18-0.19 for "
        "RTN 2-bit and for destroyed early MLPs.",
        ideal=0.0,
    ),
    Signature(
        "early_damage",
        INTERVENTION,
        "Early-block damage",
        "accuracy kept with only the early blocks (the first L/8) at the compared weights (domino test)",
        0.5,
        "below",
        "Section 4.3.2: at 2-bit, the first two of 32 layers alone lose most answers and the FP16 layers "
        "above cannot recover them. Section 4.3.1 also finds an early bottleneck at 4-bit on Llama and "
        "Mistral, so this vote alone does not make a collapse: a repair that works outweighs it.",
        ideal=1.0,
    ),
    Signature(
        "repairs",
        INTERVENTION,
        "Training-free repairs",
        "best Failure-subset accuracy (test split) reached by any repair, the no-repair baseline excluded",
        0.1,
        "below",
        "Section 4.3: protection and amplification repair a 4-bit Failure subset (Table 1); no "
        "training-free repair, EoRA included, recovers a 2-bit model.",
    ),
)
BY_NAME = {signature.name: signature for signature in SIGNATURES}
#: The mechanism's two halves (Sections 4.1 and 4.2): it is intact only if both are, so its score
#: is the lower of the two halves' mean margins (a broken FFN is not outvoted by representations
#: that the residual stream still carries, as on SmolLM2 with its first two MLPs destroyed).
MECHANISM_PARTS = {
    "components": ("sign_flip", "jaccard", "value_cosine", "focus_divergence"),
    "representations": ("cka_diagonal", "activation_subspace", "error_alignment"),
}

#: A model keeping this share of the reference's accuracy, its mechanism not broken, is Healthy.
HEALTHY_RETENTION = 0.9
#: Below this share kept, with no repair that works, Degradation is at most low confidence.
LOW_RETENTION = 0.25
#: Fewer prompts than this in the subset the evidence is read on: Inconclusive (the intervals
#: need them; ``analysis.resample.MIN_PROMPTS``).
MIN_SUBSET = 8
#: A question not answered (not measured, or no vote outside its interval) counts this much
#: agreement in the confidence: neither for nor against.
UNANSWERED = 1 / 3
#: Confidence levels shown on the cards.
CONFIDENCE_LEVELS = ((0.8, "high"), (0.6, "medium"), (0.0, "low"))
#: The cap of a low-confidence verdict (just under "medium").
LOW_CAP = 0.59
#: The early blocks: the first max(1, L // EARLY_DIVISOR) (the paper's 2-4 of 32).
EARLY_DIVISOR = 8
#: The noise floor's setting: a run's own quantization at this width or more (8-bit).
FLOOR_BITS = 8
#: A repair "worked" when it adds this much accuracy on the facts the reference knows (Robust
#: and Failure subsets together, so a repair that breaks Robust answers does not count).
REPAIR_GAIN = 0.05
#: Injection names the blocks that need more bits: the fewest leading blocks at reference
#: precision that bring back this share of the Failure subset.
INJECTION_RECOVERY = 0.5
#: A verdict card names this many of the agreeing signatures, furthest past their lines first.
DECISIVE = 3
#: The lens dates the damage to the first layer where the reference's answer has surfaced (median
#: rank within ``LENS_SURFACED``) and the model's is ``LENS_GAP`` times further down.
LENS_SURFACED, LENS_GAP = 100, 10


def early_blocks(layers: int) -> int:
    """How many leading blocks are "early": max(1, L // EARLY_DIVISOR)."""
    return max(1, layers // EARLY_DIVISOR)


def floor_shift(signature: Signature, floor: float | None) -> float:
    """How far a measured noise floor moves the signature's line: the floor's distance from the
    ideal value, at most half the line's own distance from it (a floor that bad is damage, not
    noise); 0 without a floor or an ideal."""
    if floor is None or signature.ideal is None:
        return 0.0
    limit = abs(signature.threshold - signature.ideal) / 2
    return max(-limit, min(limit, floor - signature.ideal))


#: From this fraction of the depth on, residual patching at the last token copies the reference's
#: output, so restoration there is near 1 for any model: the report's hotspots skip it.
COPY_DEPTH = 0.75
