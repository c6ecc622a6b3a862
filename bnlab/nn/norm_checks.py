"""The config checks of the built-in normalizations (`NormSpec.check`), and the batches a run
normalizes with their own statistics, which every check is given (`Batch`)."""

from __future__ import annotations

import math
from typing import NamedTuple


class Batch(NamedTuple):
    """A batch that a run normalizes with its own statistics (training mode)."""

    what: str  # "per-device batch"
    size: int  # examples
    source: str  # what sets its size: "train.batch_size over the devices"
    field: str  # the config field to change: "train.batch_size"


def batches_of(per_device_batch: int, diagnostic_batch: int | None) -> tuple[Batch, ...]:
    """The training step's batch on one device, and the diagnostics' fixed batch if measured."""
    per_device = Batch(
        "per-device batch",
        per_device_batch,
        "train.batch_size over the devices",
        "train.batch_size",
    )
    if diagnostic_batch is None:
        return (per_device,)
    source = "diagnostics.batch_size"
    return per_device, Batch("diagnostic batch", diagnostic_batch, source, source)


def _divisors_of_all(widths: tuple[int, ...]) -> list[int]:
    """Group counts that fit every width: a divisor of it, or more than it (clipped)."""
    return [g for g in range(1, max(widths) + 1) if all(w < g or w % g == 0 for w in widths)]


def groupnorm_check(n, *, widths: tuple[int, ...], batches: tuple[Batch, ...]) -> list[str]:
    del batches  # each example is normalized on its own
    bad = [w for w in widths if w >= n.num_groups and w % n.num_groups]
    if not bad:
        return []
    return [
        f"norm.num_groups={n.num_groups} does not divide the {bad[0]} channels of a normalized "
        f"layer (this model normalizes {list(widths)} channels); choose one of "
        f"{_divisors_of_all(widths)} (a layer with fewer channels than groups uses one group "
        "per channel)"
    ]


def ghost_check(n, *, widths: tuple[int, ...], batches: tuple[Batch, ...]) -> list[str]:
    del widths  # every layer has a dense one, where one example is one value per feature
    v, found = n.virtual_batch_size, []
    if v == 1 and not n.allow_single_value:
        found.append(
            "norm.virtual_batch_size=1 gives ghost_batchnorm one example per statistic: every "
            "dense layer's variance is 0 and its output the bias; use virtual batches of at "
            "least 2 or set norm.allow_single_value=true"
        )
    common = math.gcd(*(b.size for b in batches))
    divisors = [d for d in range(1, common + 1) if common % d == 0]
    found += [
        f"norm.virtual_batch_size={v} does not divide the {b.what} of {b.size} examples "
        f"({b.source}); choose one of {divisors}, or change {b.field}"
        for b in batches
        if b.size % v
    ]
    return found
