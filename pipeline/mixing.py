"""How several datasets share an epoch: each one's scenes per epoch, and which scenes, per rank and epoch.

Semantics (those of MosaicML Streaming's `proportion` and `repeat`):

* With weights, an epoch has `total` scenes, the sum of the members' split sizes (scenes with grasps), and
  member d contributes `weight_d / sum(weights) x total` of them, rounded so the counts add up to `total`.
* With repeats, member d contributes `repeat_d x size_d` scenes (rounded half up); repeat 1 for every member
  is their plain union.
* A member's count `c` of its `m` scenes is `c // m` whole passes over all of them (up-sampling) and
  `c % m` scenes more, drawn without replacement (all there is to down-sampling): every scene is used
  `c // m` or `c // m + 1` times. The drawn scenes are dealt to the ranks in proportion to the member's
  scenes each owns (largest remainder), and each rank draws its part from its own scenes, from (seed,
  epoch, rank, member).

The result is a number of copies of each of the rank's records; `plan.make_plan` turns copies into batches.
Pure NumPy: no files, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Mix:
    """The members of a split made of several datasets and what each contributes per epoch."""

    source: np.ndarray  # int64 [records]: the member each record of the split comes from
    counts: tuple[int, ...]  # scenes per epoch of each member, over all ranks


def apportion(total: int, shares: np.ndarray) -> np.ndarray:
    """`total` dealt in proportion to `shares` (largest remainder; ties go to the earlier entry)."""
    shares = np.asarray(shares, dtype=np.float64)
    if total == 0 or shares.sum() == 0:
        return np.zeros(len(shares), dtype=np.int64)
    exact = shares * (total / shares.sum())
    out = np.floor(exact).astype(np.int64)
    rest = total - int(out.sum())
    out[np.argsort(-(exact - out), kind="stable")[:rest]] += 1
    return out


def epoch_counts(
    sizes: list[int], *, weights: list[float] | None = None, repeats: list[float] | None = None
) -> tuple[int, ...]:
    """Scenes per epoch of each member: by weights (of `total = sum(sizes)`) or by repeats (of its own size)."""
    if weights is not None and repeats is not None:
        raise ValueError("give weights or repeats, not both")
    if weights is not None:
        return tuple(int(c) for c in apportion(sum(sizes), np.asarray(weights, dtype=np.float64)))
    repeats = [1.0] * len(sizes) if repeats is None else repeats
    return tuple(int(np.floor(r * n + 0.5)) for r, n in zip(repeats, sizes))


def copies(
    mix: Mix,
    num_grasps: np.ndarray,
    owner: np.ndarray,
    mine: np.ndarray,
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
) -> np.ndarray:
    """Copies of each record `mine` (this rank's, in storage order; `owner`: every record's rank) in `epoch`;
    empty records get none."""
    full = num_grasps > 0
    out = np.zeros(len(mine), dtype=np.int64)
    for d, count in enumerate(mix.counts):
        member = full & (mix.source == d)
        owned = np.bincount(owner[member], minlength=world_size)  # each rank's scenes of member d
        here = np.flatnonzero(member[mine])  # this rank's, in storage order
        if not len(here):
            continue
        passes, rest = divmod(count, int(owned.sum()))
        out[here] = passes
        rest = int(apportion(rest, owned)[rank])  # at most its scenes: every scene is used passes (+ 1) times
        rng = np.random.default_rng([seed, epoch, rank, 2, d])
        out[here[np.sort(rng.choice(len(here), rest, replace=False))]] += 1
    return out


def separate_copies(
    scene: np.ndarray, start: np.ndarray, slots: np.ndarray, batch: np.ndarray, window: np.ndarray
) -> np.ndarray:
    """An order of groups (given in batch order) in which no batch holds a grasp twice.

    Copies of a record are planned like records of their own, so two groups of one batch may hold the
    same grasp (scene, slot). Each group that repeats a grasp of an earlier group of its batch swaps
    places with the first group after it in its window (then the first before it) that clashes with
    neither batch: batch sizes stay as they were, and an order with no clash is returned
    unchanged. Where the window has none, a group of the nearest window that has one takes its place (the
    batches involved then need more windows resident: `EpochPlan.shard_span`; only with tiny windows).
    `start`: offsets of each group's grasps in `slots`; `batch`, `window`: of each position (both ascending).
    ValueError when no group fits.
    """
    n = len(scene)
    order = np.arange(n, dtype=np.int64)
    if n == 0:
        return order
    # Only a scene with several groups in one batch can clash: check those groups' grasps alone.
    pair = batch * (int(scene.max()) + 1) + scene
    ranked = np.sort(pair)
    suspect = np.flatnonzero(np.isin(pair, ranked[1:][ranked[1:] == ranked[:-1]]))
    if not len(suspect):
        return order
    width = int(slots.max()) + 1
    lengths = np.diff(start)[suspect]
    group_of = np.repeat(suspect, lengths)
    first = np.repeat(start[suspect] - np.cumsum(lengths) + lengths, lengths)
    tagged = pair[group_of] * width + slots[first + np.arange(len(group_of), dtype=np.int64)]
    sort = np.argsort(tagged, kind="stable")
    clash = np.unique(group_of[sort[1:][tagged[sort[1:]] == tagged[sort[:-1]]]])
    if not len(clash):
        return order
    batches = np.searchsorted(batch, np.arange(int(batch[-1]) + 2))
    windows = np.searchsorted(window, np.arange(int(window[-1]) + 2))

    def keys(p: int) -> set[int]:  # the grasps of the group at position p, as scene * width + slot
        g = order[p]
        return set((int(scene[g]) * width + slots[start[g] : start[g + 1]]).tolist())

    def held(p: int) -> set[int]:  # the grasps of p's batch but p's
        b = batch[p]
        return set().union(*(keys(q) for q in range(batches[b], batches[b + 1]) if q != p))

    for p in clash.tolist():
        here, mine = held(p), keys(p)
        if not mine & here:
            continue  # an earlier swap moved the clash away
        for q in _nearest(p, window, windows):
            if batch[q] != batch[p] and not keys(q) & here and not mine & held(q):
                order[p], order[q] = order[q], order[p]
                break
        else:
            raise ValueError(
                f"scene {int(scene[order[p]])}: its copies cannot be kept out of one batch (too few other scenes "
                "in the epoch); use fewer scenes per batch or a smaller repeat"
            )
    return order


def _nearest(p: int, window: np.ndarray, windows: np.ndarray):
    """Positions other than `p`, nearest window first: p's own window (after p, then before it), then the
    windows one before and one after, two before and two after, ..."""
    w, last = int(window[p]), len(windows) - 2
    yield from range(p + 1, windows[w + 1])
    yield from range(windows[w], p)
    for d in range(1, last + 1):
        for v in (w - d, w + d):
            if 0 <= v <= last:
                yield from range(windows[v], windows[v + 1])
