"""Every number the verdict depends on, in one place, each with the reason for its value.

docs/verdict.md explains the rules in plain words; change a threshold here and both the verdict
and the report's signature tables follow. Values are placed between what the paper reports for
4-bit (Signal Degradation) and 2-bit (Computation Collapse) models, and checked against
SmolLM2-135M's own 4- and 2-bit settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Signature:
    """One signature of docs/verdict.md: what is measured, where the line is, and why there.

    ``collapse_when``: on which side of ``threshold`` the value votes Computation Collapse (the
    other side votes "intact": the computation still works). ``scale``: "linear" for values in
    [0, 1], "log" for ranks; it measures how far past the line a value is, to name the
    signatures that decided a verdict."""

    name: str
    title: str
    measure: str
    threshold: float
    collapse_when: Literal["above", "below"]
    reason: str
    scale: Literal["linear", "log"] = "linear"

    @property
    def collapse_side(self) -> str:
        """The sign in "Collapse if": > for values above the threshold, < for below."""
        return ">" if self.collapse_when == "above" else "<"

    def votes_collapse(self, value: float) -> bool:
        return value > self.threshold if self.collapse_when == "above" else value < self.threshold

    def margin(self, value: float) -> float:
        """How far past the threshold a value is, as a share of the way to the end of the scale
        on its side ([0, 1] scales; for ranks, decades over the threshold's own)."""
        if self.scale == "log":
            return abs(math.log10(max(value, 1e-12) / self.threshold)) / math.log10(self.threshold)
        span = self.threshold if value < self.threshold else 1 - self.threshold
        return abs(value - self.threshold) / span


SIGNATURES: tuple[Signature, ...] = (
    Signature(
        "lens_rank",
        "Answer signal (logit lens)",
        "best median rank of the answer over the layers, as a share of the vocabulary (chance: 50%)",
        0.02,
        "above",
        "Collapse means no signal at any layer: the paper's 2-bit ranks stay in the thousands "
        "everywhere (2% of a 128k vocabulary is 2,565; of SmolLM2's 49k, 983), while a degraded "
        "model's answer still rises to the top few in late layers.",
        "log",
    ),
    Signature(
        "patching",
        "Patching response",
        "strongest restoration by one reference state (residual stream)",
        0.2,
        "below",
        "A degraded model is restored by the reference's state at the last subject token; a "
        "collapsed one is unresponsive (the paper's 2-bit heatmaps are flat near 0).",
    ),
    Signature(
        "cka_diagonal",
        "CKA diagonal",
        "mean CKA of each layer with the reference's same layer (residual, last subject token)",
        0.6,
        "below",
        "4-bit models keep the diagonal near 1; 2-bit heatmaps go dark after the first layers (about 0.3 on SmolLM2).",
    ),
    Signature(
        "activation_subspace",
        "Activation subspace",
        "mean similarity of the top-k activation subspaces above chance (residual, last subject token)",
        0.4,
        "below",
        "The paper reports 0.7-0.9 at 4-bit and about 0.1 at 2-bit; 0.4 splits the two. Chance "
        "(two random k-dimensional subspaces of a d-dimensional space overlap k/d) is taken out, "
        "so small models with large k/d are judged alike.",
    ),
    Signature(
        "error_alignment",
        "Error alignment",
        "mean share of the error's energy in the reference's top-k directions, above chance",
        0.5,
        "above",
        "A degraded model's error is noise-like (about 0.3 in the paper); a collapsed one's is "
        "aligned with the signal (about 0.8). Chance (k/d, for an error in a random direction) is "
        "taken out as for the activation subspace.",
    ),
    Signature(
        "sign_flip",
        "Gate sign flips (SFR)",
        "mean share of gate pre-activations whose sign flips",
        0.25,
        "above",
        "Above 30% at 2-bit in the paper, about 10% at 4-bit: a flipped gate switches a neuron "
        "off or on, so the FFN computes something else.",
    ),
    Signature(
        "jaccard",
        "Neuron overlap (Jaccard)",
        "mean Jaccard overlap of the top-k FFN neurons with the reference's",
        0.15,
        "below",
        "Near 0 at 2-bit (about 0.1 in the paper): different neurons fire; a degraded model "
        "keeps most of its neurons (0.4 and up).",
    ),
    Signature(
        "value_cosine",
        "FFN output direction",
        "mean cosine of the FFN output with the reference's",
        0.4,
        "below",
        "Near 0 at 2-bit (the FFN writes an unrelated vector), about 0.8 at 4-bit.",
    ),
    Signature(
        "early_damage",
        "Early-block damage",
        "accuracy kept with only the first L/8 blocks quantized (domino test)",
        0.5,
        "below",
        "Collapse starts in the early blocks: quantizing them alone already loses more than half "
        "of the facts; a degraded model loses its answers gradually over depth.",
    ),
    Signature(
        "repairs",
        "Training-free repairs",
        "best Failure-subset accuracy reached by any repair",
        0.1,
        "below",
        "The paper's repairs bring back a large share of a 4-bit model's Failure subset and none of a 2-bit model's.",
    ),
)
BY_NAME = {signature.name: signature for signature in SIGNATURES}

#: A model keeping this share of the reference's accuracy, with no collapse majority, is Healthy.
HEALTHY_RETENTION = 0.9
#: The share of measured signatures that must agree for a Degradation or Collapse verdict;
#: below it on both sides the verdict is Inconclusive.
MAJORITY = 2 / 3
#: Fewer measured signatures than this: Inconclusive (one number is not a diagnosis).
MIN_SIGNATURES = 2
#: Confidence is scaled down when fewer signatures than this could be measured.
FULL_EVIDENCE = 6
#: Confidence levels shown on the cards.
CONFIDENCE_LEVELS = ((0.8, "high"), (0.6, "medium"), (0.0, "low"))
#: The early blocks: the first max(1, L // EARLY_DIVISOR) (the paper's 2-4 of 32).
EARLY_DIVISOR = 8
#: A repair "worked" when it adds this much accuracy on the facts the reference knows (Robust
#: and Failure subsets together, so a repair that breaks Robust answers does not count).
REPAIR_GAIN = 0.05
#: Injection names the blocks that need more bits: the fewest leading blocks at reference
#: precision that bring back this share of the Failure subset.
INJECTION_RECOVERY = 0.5
#: A verdict card names this many of the agreeing signatures, furthest past their lines first:
#: enough to show the pattern behind a verdict, few enough to read at a glance.
DECISIVE = 3
#: The lens dates the damage to the first layer where the reference's answer has surfaced (median
#: rank within ``LENS_SURFACED``) and the model's is ``LENS_GAP`` times further down: a rank in
#: the top 100 is a visible signal, and a tenfold drop is a loss, not rank noise.
LENS_SURFACED, LENS_GAP = 100, 10
#: From this fraction of the depth on, residual patching at the last token copies the reference's
#: output, so restoration there is near 1 for any model: hotspots skip the last token from there.
COPY_DEPTH = 0.75
