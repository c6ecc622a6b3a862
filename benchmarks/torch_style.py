"""PyTorch CPU eager training of the same models: `torch.nn` layers, SGD, a tensor-slicing
loop (no DataLoader), `torch.set_num_threads(2)`. The throughput benchmarks import it; run as
a script it is the whole job of a user's PyTorch script (what benchmarks/wall_time.py times).

Command: python benchmarks/torch_style.py --model mlp|cnn --mnist-dir DIR [--epochs N]
         [--timed-steps K]   (prints `RESULT {"examples_per_s": ..., "test_accuracy": ...}`)
"""

from __future__ import annotations

import math

import torch
import user_jobs
from torch import nn

THREADS = 2  # the cores of the machine the benchmarks were written for


def model(name: str, bn_momentum: float = 0.99, init_std: float | None = None) -> nn.Module:
    """The CNN or the Fig. 1 MLP; `bn_momentum` in flax's convention (PyTorch's is 1 - it)."""

    def bn(cls, features):
        return cls(features, eps=1e-5, momentum=1.0 - bn_momentum)

    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            bn(nn.BatchNorm2d, 32),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            bn(nn.BatchNorm2d, 64),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 256),
            bn(nn.BatchNorm1d, 256),
            nn.ReLU(),
            nn.Linear(256, 10),
        )
    layers, width = [nn.Flatten()], 28 * 28
    for _ in range(3):
        layers += [nn.Linear(width, 100), bn(nn.BatchNorm1d, 100), nn.Sigmoid()]
        width = 100
    net = nn.Sequential(*layers, nn.Linear(width, 10))
    if init_std is not None:
        for layer in net:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=init_std)
                nn.init.zeros_(layer.bias)
    return net


def to_tensors(images, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """NHWC uint8 numpy images to NCHW float32 in [0, 1]; integer labels to int64."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    return x, torch.from_numpy(labels).long()


def evaluate(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), user_jobs.EVAL_BATCH):
            logits = net(x[i : i + user_jobs.EVAL_BATCH])
            correct += int((logits.argmax(-1) == y[i : i + user_jobs.EVAL_BATCH]).sum())
    net.train()
    return correct / len(y)


def whole_job(model_name: str, mnist_dir: str, epochs: int, timed_steps: int) -> None:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    job = user_jobs.JOBS[model_name]
    train_x, train_y, test_x, test_y = user_jobs.load_mnist(mnist_dir)
    x_all, y_all = to_tensors(train_x, train_y)
    x_test, y_test = to_tensors(test_x, test_y)
    bs = job.batch_size
    steps = len(y_all) // bs
    total = steps * epochs
    net = model(model_name, job.bn_momentum, job.init_std).train()
    opt = torch.optim.SGD(net.parameters(), lr=job.lr, momentum=job.momentum or 0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / total)) if job.cosine else 1.0
    )
    timer = user_jobs.StepTimer(total, min(timed_steps, total))
    accuracy = 0.0
    for epoch in range(epochs):
        perm = torch.randperm(len(y_all))
        losses = []
        for i in range(steps):
            timer.step(epoch * steps + i, None)  # eager: every step has finished
            idx = perm[i * bs : (i + 1) * bs]
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(net(x_all[idx]), y_all[idx])
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(loss.detach())
        torch.stack(losses).mean().item()
        if epoch == epochs - 1:
            timer.stop(None)
        accuracy = evaluate(net, x_test, y_test)
    timer.report(bs, accuracy)


if __name__ == "__main__":
    user_jobs.main(whole_job, __doc__)
