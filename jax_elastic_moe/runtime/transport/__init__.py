"""Mooncake Transfer Engine transport of one rank (see endpoint.py for the protocol and its rules)."""
from ..peers import ExchangeResult, PeerAddress, PeerFailure
from .common import DEFAULT_CONNECT_TIMEOUT, DEFAULT_EXCHANGE_TIMEOUT, SendHandle
from .endpoint import Transport
from .faults import FaultInjectingTransport

__all__ = ["DEFAULT_CONNECT_TIMEOUT", "DEFAULT_EXCHANGE_TIMEOUT", "ExchangeResult", "FaultInjectingTransport",
           "PeerAddress", "PeerFailure", "SendHandle", "Transport"]
