"""Per-key and per-project rate limits, and which project owns a recent interaction."""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable

from services.gateway.errors import RateLimitError
from services.gateway.settings import GatewaySettings, RateLimit


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; one token per request."""

    __slots__ = ("burst", "rate", "tokens", "updated_s")

    def __init__(self, limit: RateLimit, now_s: float) -> None:
        self.rate = limit.requests_per_s
        self.burst = float(limit.burst)
        self.tokens = self.burst
        self.updated_s = now_s

    def wait_s(self, now_s: float) -> float:
        """Seconds until a token is available (0: one is available now)."""
        elapsed = max(0.0, now_s - self.updated_s)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.updated_s = now_s
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate


class RateLimiter:
    """Checks a request against its key's bucket and its project's bucket."""

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._default = settings.rate_limit
        self._key_limits = settings.key_rate_limits
        self._project_limits = settings.project_rate_limits
        self._clock = clock
        # Bounded by the configured keys and projects: only known keys get here.
        self._keys: dict[str, TokenBucket] = {}
        self._projects: dict[str, TokenBucket] = {}

    @property
    def enabled(self) -> bool:
        return bool(self._default or self._key_limits or self._project_limits)

    def check(self, key_digest: str, project_id: str) -> None:
        """Take a token from every bucket that applies, or RateLimitError."""
        now_s = self._clock()
        buckets = []
        key_limit = self._key_limits.get(key_digest, self._default)
        if key_limit is not None:
            buckets.append(self._bucket(self._keys, key_digest, key_limit, now_s))
        project_limit = self._project_limits.get(project_id)
        if project_limit is not None:
            buckets.append(
                self._bucket(self._projects, project_id, project_limit, now_s)
            )
        # Take nothing unless every bucket has a token, so a refusal costs none.
        wait_s = max((bucket.wait_s(now_s) for bucket in buckets), default=0.0)
        if wait_s > 0:
            raise RateLimitError(
                "rate limit reached for this API key or its project; retry after "
                f"{wait_s:.2f} s",
                retry_after_s=wait_s,
            )
        for bucket in buckets:
            bucket.tokens -= 1.0

    @staticmethod
    def _bucket(
        buckets: dict[str, TokenBucket], name: str, limit: RateLimit, now_s: float
    ) -> TokenBucket:
        bucket = buckets.get(name)
        if bucket is None:
            bucket = buckets[name] = TokenBucket(limit, now_s)
        return bucket


class RecentInteractions:
    """The project of each of the last `max_size` interactions this gateway saw.

    Oldest first out. Ids it does not hold may still exist: served by another
    replica, before a restart, or forgotten.
    """

    def __init__(self, max_size: int) -> None:
        self._max_size = max_size
        # Keyed by the id's integer: ints are not tracked by the garbage collector,
        # UUID objects are (hundreds of thousands of them made every full
        # collection a pause of many milliseconds). An OrderedDict drops its oldest
        # in constant time; a dict's first key is found by skipping every slot
        # freed before it, tens of microseconds per call once full.
        self._owners: OrderedDict[int, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owners)

    def remember(self, interaction_id: uuid.UUID, project_id: str) -> None:
        owners, key = self._owners, interaction_id.int
        if key in owners:
            return
        owners[key] = project_id
        if len(owners) > self._max_size:
            owners.popitem(last=False)

    def owner(self, interaction_id: uuid.UUID) -> str | None:
        return self._owners.get(interaction_id.int)
