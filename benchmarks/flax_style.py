"""The flax examples/mnist style of training: linen `Conv`/`BatchNorm`/`avg_pool`/`Dense`, a
jitted `train_step(state, batch)` with optax, host-side numpy permutation and slicing, a
jitted evaluation step over test batches. The throughput benchmarks import it; run as a
script it is the whole job of a user's flax script (what benchmarks/wall_time.py times).

Command: python benchmarks/flax_style.py --model mlp|cnn --mnist-dir DIR [--epochs N]
         [--timed-steps K]   (prints `RESULT {"examples_per_s": ..., "test_accuracy": ...}`)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import user_jobs
from flax.training import train_state


def _bn(train: bool, momentum: float) -> nn.Module:
    return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=1e-5)


class FlaxCNN(nn.Module):
    bn_momentum: float = 0.99

    @nn.compact
    def __call__(self, x, train: bool):
        for features in (32, 64):
            x = nn.Conv(features, (3, 3), padding="SAME")(x)
            x = nn.relu(_bn(train, self.bn_momentum)(x))
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(_bn(train, self.bn_momentum)(nn.Dense(256)(x)))
        return nn.Dense(10)(x)


class FlaxMLP(nn.Module):
    bn_momentum: float = 0.99
    init_std: float = 0.01  # as experiments/bn_paper_mlp.py

    @nn.compact
    def __call__(self, x, train: bool):
        init = nn.initializers.normal(self.init_std)
        x = x.reshape((x.shape[0], -1))
        for _ in range(3):
            x = nn.sigmoid(_bn(train, self.bn_momentum)(nn.Dense(100, kernel_init=init)(x)))
        return nn.Dense(10, kernel_init=init)(x)


MODELS = {"cnn": FlaxCNN, "mlp": FlaxMLP}


class FlaxState(train_state.TrainState):
    batch_stats: Any


@jax.jit
def flax_train_step(state: FlaxState, batch: tuple[jax.Array, jax.Array]):
    images, labels = batch

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}


@jax.jit
def flax_eval_step(state: FlaxState, batch):
    images, labels = batch
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, images, train=False
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()
    return loss, jnp.sum(jnp.argmax(logits, -1) == labels)


def create_state(model: nn.Module, sample: np.ndarray, tx, seed: int = 0) -> FlaxState:
    variables = model.init(jax.random.key(seed), sample, train=False)
    return FlaxState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=tx,
    )


def evaluate(state: FlaxState, images: np.ndarray, labels: np.ndarray) -> float:
    eb = user_jobs.EVAL_BATCH
    totals = [
        flax_eval_step(state, (images[i : i + eb], labels[i : i + eb]))
        for i in range(0, len(labels), eb)
    ]
    return float(sum(correct for _, correct in jax.device_get(totals))) / len(labels)


def whole_job(model_name: str, mnist_dir: str, epochs: int, timed_steps: int) -> None:
    job = user_jobs.JOBS[model_name]
    train_x, train_y, test_x, test_y = user_jobs.load_mnist(mnist_dir)
    images = train_x.astype(np.float32) / 255.0  # flax mnist: floats prepared up front
    test_images = test_x.astype(np.float32) / 255.0
    labels, test_labels = train_y.astype(np.int32), test_y.astype(np.int32)
    bs = job.batch_size
    steps = len(labels) // bs
    total = steps * epochs
    lr = optax.cosine_decay_schedule(job.lr, total) if job.cosine else job.lr
    kwargs = {} if job.init_std is None else {"init_std": job.init_std}
    model = MODELS[model_name](bn_momentum=job.bn_momentum, **kwargs)
    state = create_state(model, images[:bs], optax.sgd(lr, momentum=job.momentum))
    rng = np.random.default_rng(0)
    timer = user_jobs.StepTimer(total, min(timed_steps, total), jax.block_until_ready)
    accuracy = 0.0
    for epoch in range(epochs):
        perms = rng.permutation(len(labels))[: steps * bs].reshape(steps, bs)
        metrics = []
        for i, perm in enumerate(perms):
            timer.step(epoch * steps + i, state)
            state, m = flax_train_step(state, (images[perm], labels[perm]))
            metrics.append(m)
        jax.device_get(metrics)  # as flax examples: metrics fetched once per epoch
        if epoch == epochs - 1:
            timer.stop(state)
        accuracy = evaluate(state, test_images, test_labels)
    timer.report(bs, accuracy)


if __name__ == "__main__":
    user_jobs.main(whole_job, __doc__)
