"""What ranks tell each other and what an exchange reports: PeerAddress, ExchangeResult, PeerFailure."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping

__all__ = ["ExchangeResult", "PeerAddress", "PeerFailure"]


class PeerFailure(RuntimeError):
    """Transfers to or from `ranks` failed or timed out; `reason` says how. The step is abandoned."""

    def __init__(self, ranks, reason: str):
        self.ranks = tuple(sorted({int(r) for r in ranks}))
        self.reason = reason
        super().__init__(f"peer rank(s) {list(self.ranks)} failed: {reason}")

    @classmethod
    def from_failures(cls, failed: Mapping[int, str]) -> "PeerFailure":
        reason = "; ".join(f"rank {r}: {why}" for r, why in sorted(failed.items()))
        return cls(failed.keys(), reason)


@dataclass(frozen=True)
class PeerAddress:
    """Where a rank's regions live; the controller hands every rank the table of these.

    `token` is random per Transport instance, so a restarted rank never compares equal to its
    previous incarnation even if the OS hands it the same port and addresses.
    """

    rank: int
    host: str
    rpc_port: int
    recv_base: int
    recv_nbytes: int
    weights_base: int
    weights_nbytes: int
    layout: tuple
    token: int

    @property
    def segment(self) -> str:
        """Mooncake segment name (P2P handshake: host:rpc_port)."""
        return f"{self.host}:{self.rpc_port}"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["layout"] = list(self.layout)
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> "PeerAddress":
        names = [f for f in cls.__dataclass_fields__]
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"peer address is missing field(s) {missing}: {dict(data)!r}")
        try:
            values = {n: (str(data[n]) if n == "host" else int(data[n])) for n in names if n != "layout"}
            layout = tuple(int(v) for v in data["layout"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"peer address has a field of the wrong type: {dict(data)!r}") from e
        return cls(layout=layout, **values)

    @classmethod
    def coerce(cls, value) -> "PeerAddress":
        if isinstance(value, PeerAddress):
            return value
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        raise TypeError(f"expected a PeerAddress or its dict, got {type(value).__name__}")


@dataclass
class ExchangeResult:
    """Outcome of recv / wait_sends / exchange.

    payloads: source rank -> arrays of the payload it sent for this seq (views into the receive
      region unless copy=True; see Transport.recv for how long a view stays valid).
    failed: suspect rank -> why (write failed, no completion or no signal within the deadline,
      corrupt payload, fault injection).
    silent: the ranks of `failed` named only because their signal did not arrive in time. A live
      rank that is itself stuck waiting on a dead one is silent too, so silence is weaker evidence
      than a failed or timed-out write to the rank (`direct`); the controller confirms.
    """

    payloads: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)
    silent: set = field(default_factory=set)

    @property
    def direct(self) -> set:
        """Ranks named by direct evidence: their transfers failed or timed out, or their data was bad."""
        return set(self.failed) - self.silent

    @property
    def ok(self) -> bool:
        return not self.failed

    def raise_for_failures(self) -> "ExchangeResult":
        if self.failed:
            raise PeerFailure.from_failures(self.failed)
        return self
