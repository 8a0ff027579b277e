"""The routing table in Python form, sticky bucket assignment, and its protobuf mapping.

Assignment: a user (or, without one, a session) is hashed into one of 10,000 buckets
with SHA-256 over "route:key", so the same user lands in the same bucket on every
gateway replica and every restart. Variants own consecutive bucket ranges in table
order; a canary is listed first, so raising its weight from 5% to 25% only adds buckets
and everyone already in the canary stays there.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from services.common.pb.flywheel.v1 import control_pb2 as pb

BUCKETS = 10_000


def bucket_of(route: str, key: str) -> int:
    """The stable bucket in [0, 10,000) of `key` (user or session id) on `route`."""
    digest = hashlib.sha256(f"{route}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


@dataclass(frozen=True)
class Variant:
    """One upstream a route can send to, with its share of the buckets."""

    name: str
    base_url: str
    model: str
    weight_buckets: int
    adapter: str = ""
    model_version: str = ""
    arm: str = ""

    @property
    def upstream_model(self) -> str:
        """The model name sent upstream: the adapter when there is one."""
        return self.adapter or self.model


@dataclass(frozen=True)
class Route:
    """A `model` name applications ask for, mapped to weighted variants."""

    name: str
    variants: tuple[Variant, ...]
    experiment_id: str = ""

    def __post_init__(self) -> None:
        total = sum(variant.weight_buckets for variant in self.variants)
        if total != BUCKETS:
            raise ValueError(
                f"route {self.name!r}: variant weights must add up to {BUCKETS} "
                f"buckets, got {total}"
            )

    def assign(self, bucket: int) -> Variant:
        """The variant that owns `bucket`."""
        upper = 0
        for variant in self.variants:
            upper += variant.weight_buckets
            if bucket < upper:
                return variant
        raise AssertionError("weights add up to BUCKETS, checked at construction")

    def variant_named(self, name: str) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)


@dataclass(frozen=True)
class RoutingTable:
    """Every route, at one version."""

    version: int
    routes: dict[str, Route] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "routes": [
                {
                    "name": route.name,
                    "experiment_id": route.experiment_id,
                    "variants": [vars(variant) for variant in route.variants],
                }
                for route in self.routes.values()
            ],
        }

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> RoutingTable:
        routes = {
            item["name"]: Route(
                name=item["name"],
                experiment_id=item.get("experiment_id", ""),
                variants=tuple(Variant(**variant) for variant in item["variants"]),
            )
            for item in body["routes"]
        }
        return cls(version=int(body["version"]), routes=routes)

    def to_proto(self) -> pb.RoutingTable:
        return pb.RoutingTable(
            version=self.version,
            routes=[
                pb.Route(
                    name=route.name,
                    experiment_id=route.experiment_id,
                    variants=[
                        pb.Variant(**vars(variant)) for variant in route.variants
                    ],
                )
                for route in self.routes.values()
            ],
        )

    @classmethod
    def from_proto(cls, message: pb.RoutingTable) -> RoutingTable:
        routes = {
            route.name: Route(
                name=route.name,
                experiment_id=route.experiment_id,
                variants=tuple(
                    Variant(
                        name=v.name,
                        base_url=v.base_url,
                        model=v.model,
                        weight_buckets=v.weight_buckets,
                        adapter=v.adapter,
                        model_version=v.model_version,
                        arm=v.arm,
                    )
                    for v in route.variants
                ),
            )
            for route in message.routes
        }
        return cls(version=message.version, routes=routes)
