"""Checkpoints that resume exactly: both models, both optimizers, the noise RNG, the histories, a fingerprint.

One npz file, written atomically: a crash while writing leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
from keras import ops

from pipeline.config import Config, to_flat_dict
from pipeline.devices import from_writer
from pipeline.files import atomic_path

log = logging.getLogger(__name__)

BEST = "best_generator"


@dataclass
class TrainState:
    """Everything besides the variables that a resumed run needs to go on where it stopped."""

    fingerprint: str
    epoch: int = 0
    run_id: str | None = None
    history: list[dict] = field(default_factory=list)
    fid_history: list[dict] = field(default_factory=list)
    best: dict | None = None
    # When each checkpointed epoch was first logged: re-logging with the same time after a crash
    # is a no-op in MLflow's SQL stores, so no epoch is lost or doubled wherever the crash lands.
    log_times: dict[str, int] = field(default_factory=dict)


def training_fingerprint(config: Config, images: np.ndarray, labels: np.ndarray, classifier: keras.Model) -> str:
    """Returns a hash of what training depends on: params (but where it stops), data and the evaluator."""
    params = {k: v for k, v in to_flat_dict(config).items()
              # More epochs or time extend a run; sampling and evaluation do not touch training.
              if k.split(".")[0] in ("seed", "data", "model", "train")
              and k not in ("train.epochs", "train.time_limit_minutes")}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels).tobytes())
    for weight in classifier.get_weights():
        digest.update(weight.tobytes())
    return digest.hexdigest()


def _variables(gan) -> dict[str, list]:
    """Returns every variable a checkpoint holds, by part, in the order it stores them."""
    return {"generator": gan.generator.variables, "discriminator": gan.discriminator.variables,
            "g_optimizer": gan.g_optimizer.variables, "d_optimizer": gan.d_optimizer.variables,
            "rng": [gan.noise_seed.state]}


def save_checkpoint(gan, state: TrainState, best_weights: list[np.ndarray] | None, path: Path) -> None:
    """Writes every variable of `gan`, the best generator's weights and `state` to one npz, atomically."""
    arrays = {"state": np.array(json.dumps(dataclasses.asdict(state)))}
    for part, variables in _variables(gan).items():
        for i, variable in enumerate(variables):
            arrays[f"{part}/{i}"] = ops.convert_to_numpy(variable)
    for i, weight in enumerate(best_weights or []):
        arrays[f"{BEST}/{i}"] = weight
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


def read_state(path: Path, fingerprint: str, epochs: int | None = None) -> TrainState | None:
    """Returns the state of the checkpoint at `path` if it can resume this run of `epochs`, else None, saying why."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            state = TrainState(**json.loads(str(npz["state"])))
    except Exception as e:  # a damaged file of any kind means: start fresh, never crash
        log.warning("checkpoint %s is unreadable (%s: %s); starting fresh", path, type(e).__name__, e)
        return None
    if state.fingerprint != fingerprint:
        log.warning("checkpoint %s was made with other params or data (fingerprint %s..., now %s...); "
                    "starting fresh", path, state.fingerprint[:12], fingerprint[:12])
        return None
    if epochs is not None and state.epoch > epochs:
        # Fewer epochs than the checkpoint has is another run (`-S train.epochs=1` after 50), not one to resume:
        # resuming would hand back the longer run's generator.
        log.warning("checkpoint %s is after epoch %d, past train.epochs %d; starting fresh", path, state.epoch,
                    epochs)
        return None
    log.info("resuming from %s after epoch %d", path, state.epoch)
    return state


def restore_checkpoint(gan, path: Path | None) -> list[np.ndarray] | None:
    """Returns the best generator's weights stored at `path`, after loading every variable into `gan`.

    With several processes, process 0 alone reads `path` (the others pass None, and get None back) and every
    process assigns the values it read: processes on other machines need no copy of the file, and all change
    their shared variables together.
    """
    # Both optimizers' variables exist only after a first step: made now, so that they can be assigned.
    gan.optimizer.build()  # steps.OptimizerPair: each optimizer on its own model, once
    parts = _variables(gan)
    best = None
    if path is None:  # filled with process 0's values by from_writer below
        values = {part: [np.zeros(v.shape, v.dtype) for v in variables] for part, variables in parts.items()}
    else:
        with np.load(path, allow_pickle=False) as npz:
            values = {}
            for part, variables in parts.items():
                stored = sum(1 for key in npz.files if key.startswith(part + "/"))
                if stored != len(variables):
                    raise ValueError(f"{path}: {part} has {stored} variables, the model {len(variables)}")
                values[part] = [npz[f"{part}/{i}"] for i in range(len(variables))]
            best = sorted((k for k in npz.files if k.startswith(BEST + "/")), key=lambda k: int(k.split("/")[1]))
            best = [npz[k] for k in best] or None
    values = from_writer(values)
    for part, variables in parts.items():
        for variable, value in zip(variables, values[part]):
            variable.assign(value)
    return best
