"""The gradient step, the one backend-specific piece of training: one small module per Keras backend.

`GAN` (pipeline/train.py) holds everything else, written in keras.ops and keras.random: latent
sampling, instance noise, the losses and the metrics. A step module only differentiates those
losses and applies the two optimizers, the way its backend's Keras trainer calls `train_step`.
"""

from __future__ import annotations

import functools
import importlib

import keras

from pipeline.errors import PipelineError

BACKENDS = ("tensorflow", "jax")


def train_step(gan, *args):
    """Runs one step of `gan`: `(data)` under TensorFlow's trainer, `(state, data)` under JAX's."""
    return _module(keras.backend.backend()).train_step(gan, *args)


@functools.cache
def _module(backend: str):
    if backend not in BACKENDS:
        raise PipelineError(f"no GAN training step for the Keras backend {backend!r}; "
                            f"supported: {', '.join(BACKENDS)} (set KERAS_BACKEND)")
    return importlib.import_module(f"{__name__}.{backend}")


class OptimizerPair:
    """The GAN's two optimizers presented as the one `model.optimizer` Keras' trainers expect.

    Keras' JAX trainer hands the jitted step `model.optimizer.variables` (and writes them back
    after each epoch, and reads them for sharding); these are the discriminator's optimizer's
    followed by the generator's, so the JAX step receives and returns both. `build` gives each
    optimizer its own model's weights (fit builds an unbuilt `model.optimizer` before training).

    Deliberately not a keras Optimizer: fit() would call its `finalize_variable_values` at the end
    of training, which with `use_ema` overwrites the generator's trained weights with their average.
    """

    def __init__(self, d_optimizer, discriminator, g_optimizer, generator):
        self.pairs = ((d_optimizer, discriminator), (g_optimizer, generator))

    @property
    def built(self) -> bool:
        return all(optimizer.built for optimizer, _ in self.pairs)

    def build(self, variables=None) -> None:
        """Builds each optimizer on its own model's trainable variables (`variables`, all of them, is ignored)."""
        for optimizer, model in self.pairs:
            if not optimizer.built:
                optimizer.build(model.trainable_variables)

    @property
    def variables(self) -> list:
        return [v for optimizer, _ in self.pairs for v in optimizer.variables]
