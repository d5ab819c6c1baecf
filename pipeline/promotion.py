"""The promotion gate: whether a new generator replaces the champion, decided from numbers alone.

The champion is scored again by this run's evaluator (its classifier, real images, sample count and noise:
FID compares only within one extractor) and the new generator must beat it on every count: an FID lower
by `register.margin`, no fewer classes covered (`modes`), and no memorization (`memorization_distance_ratio`
above `register.min_memorization_ratio`). A first version, with no champion to beat, becomes champion.
No MLflow here: pipeline/registry.py registers, records the decision and moves the aliases.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import keras
import numpy as np

from pipeline.config import Config, RegisterConfig
from pipeline.evaluate import evaluate_generator
from pipeline.models import latent_dim_of

CHAMPION = "champion"
CHALLENGER = "challenger"
# The metrics the gate reads, as metrics/eval.json and evaluate_generator name them.
GATE_METRICS = ("fid", "modes", "memorization_distance_ratio")


@dataclass(frozen=True)
class Decision:
    """The alias a new version gets, why, and the numbers behind it (flat, for metrics/promotion.json)."""

    alias: str
    reasons: str
    values: dict[str, float]

    def as_metrics(self) -> dict[str, float | str]:
        return {"decision": self.alias, "reasons": self.reasons, **self.values}


def decide(rules: RegisterConfig, candidate: Mapping[str, float],
           champion: Mapping[str, float] | None) -> Decision:
    """Returns the alias `candidate`'s metrics earn against `champion`'s (None: there is no champion)."""
    values = {"candidate_fid": float(candidate["fid"]), "candidate_modes": float(candidate["modes"]),
              "candidate_memorization_distance_ratio": float(candidate["memorization_distance_ratio"]),
              "margin": rules.margin, "min_memorization_ratio": rules.min_memorization_ratio}
    if champion is None:
        return Decision(CHAMPION, "no champion yet: the first version becomes champion", values)
    values.update(champion_fid=float(champion["fid"]), champion_modes=float(champion["modes"]),
                  champion_memorization_distance_ratio=float(champion["memorization_distance_ratio"]))
    values["fid_gain"] = values["champion_fid"] - values["candidate_fid"]
    checks = {
        "fid": (values["fid_gain"] > rules.margin,
                (f"FID {values['candidate_fid']:.3f} vs the champion's {values['champion_fid']:.3f}: "
                 f"{values['fid_gain']:+.3f} lower, margin {rules.margin:g}")),
        "modes": (values["candidate_modes"] >= values["champion_modes"],
                  f"{values['candidate_modes']:.0f} classes vs the champion's {values['champion_modes']:.0f}"),
        "memorization": (values["candidate_memorization_distance_ratio"] > rules.min_memorization_ratio,
                         (f"memorization_distance_ratio {values['candidate_memorization_distance_ratio']:.3f}, "
                          f"must exceed {rules.min_memorization_ratio:g}")),
    }
    values.update({f"{name}_check": float(passed) for name, (passed, _) in checks.items()})
    failed = [text for passed, text in checks.values() if not passed]
    if failed:
        return Decision(CHALLENGER, "kept the champion: " + "; ".join(failed), values)
    return Decision(CHAMPION, "beat the champion: " + "; ".join(text for _, text in checks.values()), values)


def score_generator(config: Config, generator: keras.Model, extractor: keras.Model,
                    train: tuple[np.ndarray, np.ndarray], holdout: tuple[np.ndarray, np.ndarray]) -> dict:
    """Returns evaluate_generator's metrics of `generator` under this run's evaluator and noise seed.

    A generator with another latent width (an older champion) gets noise of its own width from the same seed.
    """
    latent_dim = latent_dim_of(generator)
    if latent_dim != config.train.latent_dim:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, latent_dim=latent_dim))
    return evaluate_generator(config, generator, extractor, train, holdout)
