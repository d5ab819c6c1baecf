"""The gradient step on JAX: a pure function of the trainer's state, which Keras' JAX trainer jits.

GAN's shared losses run in one StatelessScope that maps every variable of the GAN to its value
in the state (Layer.stateless_call does the same for one model; the losses also read the GAN's
own noise RNG and instance-noise std). The updates made there (BatchNorm's moving statistics,
the SeedGenerators keras.random draws from) come back out of the scope into the returned state,
so each step draws fresh noise. `model.optimizer` is an OptimizerPair: the optimizer state holds
the discriminator's optimizer's variables, then the generator's, each updated by its
optimizer's stateless_apply (Adam's slots, its iterations and, with use_ema, the averages).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import keras


def train_step(gan, state, data):
    """Returns (metrics, new state) after `d_steps` discriminator updates and one generator update on `data`."""
    trainable, non_trainable, optimizer_values, metrics_values = state
    real, labels = gan.unpack(data)
    models = (gan.discriminator, gan.generator)
    position = {id(v): i for i, v in enumerate(gan.trainable_variables)}
    d_weights, g_weights = ([trainable[position[id(v)]] for v in m.trainable_variables] for m in models)
    d_count = len(gan.d_optimizer.variables)
    d_slots, g_slots = optimizer_values[:d_count], optimizer_values[d_count:]

    def run(d_weights, g_weights, forward):
        """Returns forward()'s result with the GAN's variables read from these values, and the new non-trainables."""
        mapping = [*zip(gan.discriminator.trainable_variables, d_weights),
                   *zip(gan.generator.trainable_variables, g_weights),
                   *zip(gan.non_trainable_variables, non_trainable)]
        with keras.StatelessScope(state_mapping=mapping) as scope:
            result = forward()
        return result, [scope.get_current_value(v) for v in gan.non_trainable_variables]

    for _ in range(gan.d_steps - 1):  # the extra discriminator-only updates
        grad_fn = jax.value_and_grad(lambda d: run(d, g_weights, lambda: gan.discriminator_loss(real, labels)),
                                     has_aux=True)
        (_, non_trainable), d_grads = grad_fn(d_weights)
        d_weights, d_slots = gan.d_optimizer.stateless_apply(d_slots, d_grads, d_weights)

    def joint(d, g):
        (d_loss, g_loss, real_logits, fake_logits), updated = run(d, g, lambda: gan.joint_losses(real, labels))
        return (d_loss, g_loss), (real_logits, fake_logits, updated)

    # One forward pass, pulled back twice: d_loss to the discriminator, g_loss to the generator.
    (d_loss, g_loss), pullback, (real_logits, fake_logits, non_trainable) = jax.vjp(joint, d_weights, g_weights,
                                                                                   has_aux=True)
    d_grads, _ = pullback((jnp.ones_like(d_loss), jnp.zeros_like(g_loss)))
    _, g_grads = pullback((jnp.zeros_like(d_loss), jnp.ones_like(g_loss)))
    d_weights, d_slots = gan.d_optimizer.stateless_apply(d_slots, d_grads, d_weights)
    g_weights, g_slots = gan.g_optimizer.stateless_apply(g_slots, g_grads, g_weights)

    with keras.StatelessScope(state_mapping=list(zip(gan.metrics_variables, metrics_values))) as scope:
        logs = gan.record_metrics(d_loss, g_loss, real_logits, fake_logits)
    metrics_values = [scope.get_current_value(v) for v in gan.metrics_variables]

    trainable = list(trainable)
    for model, weights in zip(models, (d_weights, g_weights)):
        for variable, value in zip(model.trainable_variables, weights):
            trainable[position[id(variable)]] = value
    return logs, (trainable, non_trainable, [*d_slots, *g_slots], metrics_values)
