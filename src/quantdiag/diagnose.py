"""``quantdiag diagnose`` as one library call: compare checkpoints (and any of quantdiag's own
settings) with a reference, and return each compared model's verdict with the report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from quantdiag.config import RunConfig
from quantdiag.errors import QuantdiagError
from quantdiag.pipeline import run
from quantdiag.verdict.rules import COLLAPSE, DEGRADATION, HEALTHY, INCONCLUSIVE

#: Exit codes for scripts and CI gates: the worst verdict among the compared models decides.
EXIT_CODES = {HEALTHY: 0, DEGRADATION: 3, COLLAPSE: 4, INCONCLUSIVE: 5}
_SEVERITY = (HEALTHY, INCONCLUSIVE, DEGRADATION, COLLAPSE)


@dataclass(frozen=True)
class Diagnosis:
    """The report's path and, per compared model, its key, label and verdict."""

    report: Path
    models: list[dict]

    @property
    def exit_code(self) -> int:
        """Of the worst verdict: Collapse over Degradation over Inconclusive over Healthy."""
        worst = max((model["verdict"]["verdict"] for model in self.models), key=_SEVERITY.index)
        return EXIT_CODES[worst]

    def to_json(self) -> dict:
        return {"report": str(self.report), "exit_code": self.exit_code, "models": self.models}


def diagnose(config: RunConfig) -> Diagnosis:
    """Run the diagnosis of ``config`` (which names what to compare) and collect the verdicts."""
    if not config.compare and not config.methods:
        raise QuantdiagError(
            "nothing to diagnose: give --compare PATH (a GPTQ or AWQ folder, a GGUF file or a float checkpoint)"
        )
    result = run(config)
    return Diagnosis(result.report, result.verdicts)
