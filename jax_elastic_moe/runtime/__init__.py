"""Multi-process runtime building blocks (mooncake mode): the Mooncake data-plane transport, heartbeat
failure detection and the pyzmq control-plane message layer. See RUNTIME.md."""
from .control import (ControlClient, ControlError, ControlServer, ControlTimeout, Incoming, ProtocolError,
                      message, register_message)
from .detector import (DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_HEARTBEAT_TIMEOUT, HeartbeatDetector, HeartbeatEvent,
                       HeartbeatMonitor, HeartbeatSender, PeerHealth, new_incarnation)
from .layout import PayloadError, RegionLayout
from .transport import DEFAULT_EXCHANGE_TIMEOUT, ExchangeResult, PeerAddress, PeerFailure, SendHandle, Transport

__all__ = [
    "ControlClient", "ControlError", "ControlServer", "ControlTimeout", "Incoming", "ProtocolError", "message",
    "register_message",
    "DEFAULT_HEARTBEAT_INTERVAL", "DEFAULT_HEARTBEAT_TIMEOUT", "HeartbeatDetector", "HeartbeatEvent",
    "HeartbeatMonitor", "HeartbeatSender", "PeerHealth", "new_incarnation",
    "PayloadError", "RegionLayout",
    "DEFAULT_EXCHANGE_TIMEOUT", "ExchangeResult", "PeerAddress", "PeerFailure", "SendHandle", "Transport",
]
