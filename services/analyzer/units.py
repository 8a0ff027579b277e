"""Distinct assignment units per experiment arm, for the sample-ratio-mismatch check.

The gateway assigns a variant per *unit*, not per request (services/common/routing.py):
the unit is the user, else the session, else the single request (without either the
gateway hashes a fresh random key, so each request is assigned on its own). The
requests of one unit are not independent, so the SRM chi-square must count units.

Rule (`unit_of`): an interaction's unit is its `user_id` (already pseudonymized by the
gateway), else its `session_id`, else the interaction itself (`interaction_id`).

How units are counted: an exact set while an experiment has at most `capacity` sampled
units, then a uniform *hash sample* of them (adaptive sampling, Wegman; Flajolet 1990):
a unit is kept when its 64-bit hash has `level` leading zero bits, and each time the
sample outgrows the capacity the level goes up by one, which drops about half of it.
Why not a HyperLogLog per arm: its estimates carry a relative error of about
1.04/sqrt(2^precision) (0.8 % at precision 14), which at a few thousand units per arm
is as large as the binomial noise the chi-square allows, and grows linearly with the
count, so an uncorrected chi-square on HLL counts fires falsely at scale (the bug we
are fixing), and a corrected one cannot see a 52/48 split of 10,000 users. The sample
has no such error: the sampling hash (BLAKE2b, personalized) is independent of the
routing hash (SHA-256 of "route:key"), so under the planned split the arms of the
sampled units are i.i.d. draws of it and the chi-square on the sampled counts is
exact in distribution; below the capacity it is the full count. Memory is bounded by
`capacity` members per live experiment; members of experiments that left the routing
table are dropped. Two samples merge (`merge_into`): take the higher level, union.

The members live as keys `[experiment, arm, unit hash]` of a mapping (a faust table in
the app, a dict in tests) so that a new unit writes one small changelog record rather
than the whole sample.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from services.common.events import Interaction

HASH_BITS = 64
HASH_PERSON = b"flywheel-units"


def unit_of(interaction: Interaction) -> str:
    """The assignment unit of an interaction: user, else session, else the request."""
    if interaction.user_id:
        return f"user:{interaction.user_id}"
    if interaction.session_id:
        return f"session:{interaction.session_id}"
    return f"request:{interaction.interaction_id}"


def unit_hash(unit: str) -> str:
    """The 64-bit sampling hash of a unit, as 16 hex digits."""
    return hashlib.blake2b(
        unit.encode(), digest_size=HASH_BITS // 8, person=HASH_PERSON
    ).hexdigest()


def in_sample(hash_hex: str, level: int) -> bool:
    """Whether a unit belongs to the sample at `level` (level 0 keeps every unit)."""
    return level == 0 or int(hash_hex, 16) >> (HASH_BITS - level) == 0


def member_key(experiment_id: str, arm: str, hash_hex: str) -> str:
    return json.dumps([experiment_id, arm, hash_hex])


def split_member_key(key: str) -> tuple[str, str, str]:
    experiment_id, arm, hash_hex = json.loads(key)
    return str(experiment_id), str(arm), str(hash_hex)


@dataclass(frozen=True)
class UnitCounts:
    """An experiment's sampled distinct units per arm, and the sampling level."""

    level: int = 0
    sampled: Mapping[str, int] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        return self.level == 0

    @property
    def total(self) -> int:
        return sum(self.sampled.values())

    def estimate(self, arm: str) -> int:
        """The estimated distinct units of `arm` (exact at level 0)."""
        return self.sampled.get(arm, 0) << self.level


def add_unit(
    members: MutableMapping[str, Any],
    counts: UnitCounts,
    experiment_id: str,
    arm: str,
    hash_hex: str,
    capacity: int,
) -> UnitCounts:
    """The counts after one more unit observation (a no-op for a known unit)."""
    if not in_sample(hash_hex, counts.level):
        return counts
    key = member_key(experiment_id, arm, hash_hex)
    if members.get(key) is not None:
        return counts
    members[key] = 1
    sampled = {**counts.sampled, arm: counts.sampled.get(arm, 0) + 1}
    return _bounded(members, UnitCounts(counts.level, sampled), experiment_id, capacity)


def _bounded(
    members: MutableMapping[str, Any],
    counts: UnitCounts,
    experiment_id: str,
    capacity: int,
) -> UnitCounts:
    while counts.total > capacity:
        counts = resample(members, experiment_id, counts.level + 1)
    return counts


def resample(
    members: MutableMapping[str, Any], experiment_id: str, level: int
) -> UnitCounts:
    """Drop the experiment's members outside the sample at `level`; recount them."""
    sampled: dict[str, int] = {}
    for key in list(members.keys()):
        experiment, arm, hash_hex = split_member_key(key)
        if experiment != experiment_id or members.get(key) is None:
            continue
        if in_sample(hash_hex, level):
            sampled[arm] = sampled.get(arm, 0) + 1
        else:
            del members[key]
    return UnitCounts(level, sampled)


def merge_into(
    members: MutableMapping[str, Any],
    counts: UnitCounts,
    experiment_id: str,
    other: Iterable[tuple[str, str]],
    other_level: int,
    capacity: int,
) -> UnitCounts:
    """Merge another sample of the same experiment ((arm, hash) pairs at its level)."""
    if other_level > counts.level:
        counts = resample(members, experiment_id, other_level)
    for arm, hash_hex in other:
        counts = add_unit(members, counts, experiment_id, arm, hash_hex, capacity)
    return counts


def drop_experiments(
    members: MutableMapping[str, Any], experiment_ids: set[str]
) -> int:
    """Delete every member of `experiment_ids`; returns how many were deleted."""
    dropped = 0
    for key in list(members.keys()):
        if split_member_key(key)[0] in experiment_ids:
            del members[key]
            dropped += 1
    return dropped
