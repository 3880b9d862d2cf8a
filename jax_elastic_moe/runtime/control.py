"""Control-plane messages between the controller and the workers, over pyzmq.

Messages are plain dicts with a "type" key and the fields that type requires (`MESSAGE_FIELDS`),
encoded with msgpack (never pickle: a control port must not execute what it receives). Extra fields
are allowed; numpy scalars and arrays must be converted to ints/lists by the caller.

Sockets: the controller's `ControlServer` binds a ROUTER; each worker's `ControlClient` connects a
DEALER with its own identity (e.g. b"rank-3"). Frames are [kind, request id, payload] with kind
b"req" (expects a reply), b"rep" (a reply, same request id) or b"note" (one-way, either direction).
DEALER/ROUTER rather than REQ/REP because a REQ socket is wedged forever by one lost reply; here a
timed-out request is simply forgotten and its late reply dropped. Every receive has a timeout, every
send is non-blocking, every socket closes with linger 0.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Iterable, Mapping

import msgpack
import zmq

__all__ = [
    "ControlClient", "ControlError", "ControlServer", "ControlTimeout", "Incoming", "MESSAGE_FIELDS",
    "ProtocolError", "bind_endpoint", "decode", "encode", "make_socket", "message", "register_message", "validate",
]

# type -> required fields. Workers send register / suspect / heartbeat; the controller sends epoch /
# shutdown; ack and error answer requests.
MESSAGE_FIELDS: dict[str, frozenset] = {
    "register": frozenset({"rank", "address"}),
    "heartbeat": frozenset({"rank", "incarnation", "n"}),
    "suspect": frozenset({"rank", "epoch", "suspects", "reason"}),
    "epoch": frozenset({"epoch", "active", "peers"}),
    "shutdown": frozenset(),
    "ack": frozenset(),
    "error": frozenset({"reason"}),
}

_REQ, _REP, _NOTE = b"req", b"rep", b"note"


class ControlError(RuntimeError):
    """A control-plane operation failed."""


class ControlTimeout(ControlError, TimeoutError):
    """Nothing arrived before the timeout."""


class ProtocolError(ControlError, ValueError):
    """A message is malformed: not a dict, unknown type, missing fields, undecodable bytes."""


def register_message(type_: str, fields: Iterable[str]):
    """Declare a message type and its required fields (for layers built on this one)."""
    if not isinstance(type_, str) or not type_:
        raise ValueError(f"message type must be a non-empty str, got {type_!r}")
    fields = frozenset(fields)
    if type_ in MESSAGE_FIELDS and MESSAGE_FIELDS[type_] != fields:
        raise ValueError(f"message type {type_!r} is already declared with fields {sorted(MESSAGE_FIELDS[type_])}")
    MESSAGE_FIELDS[type_] = fields


def validate(msg) -> dict:
    """Return `msg` if it is a well-formed message, else raise ProtocolError saying what is wrong."""
    if not isinstance(msg, Mapping):
        raise ProtocolError(f"a message must be a dict, got {type(msg).__name__}")
    type_ = msg.get("type")
    if type_ not in MESSAGE_FIELDS:
        raise ProtocolError(f"unknown message type {type_!r}; known: {sorted(MESSAGE_FIELDS)}")
    missing = MESSAGE_FIELDS[type_] - msg.keys()
    if missing:
        raise ProtocolError(f"{type_!r} message is missing field(s) {sorted(missing)}")
    return dict(msg)


def message(type_: str, **fields) -> dict:
    """Build and validate a message: message("suspect", rank=1, epoch=3, suspects=[2], reason="...")."""
    return validate({"type": type_, **fields})


def encode(msg: Mapping) -> bytes:
    try:
        return msgpack.packb(validate(msg), use_bin_type=True)
    except TypeError as e:
        raise ProtocolError(f"{msg.get('type')!r} message has a field msgpack cannot encode: {e}") from e


def decode(data: bytes) -> dict:
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except ValueError as e:  # every msgpack decoding error derives from it
        raise ProtocolError(f"undecodable message ({len(data)} bytes): {e}") from e
    return validate(msg)


def make_socket(context: zmq.Context, kind: int, **options) -> zmq.Socket:
    """A socket with linger 0 (close never waits on unsent messages) plus `options` (zmq names)."""
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name), value)
    return sock


def bind_endpoint(sock: zmq.Socket, endpoint: str) -> str:
    """Bind `sock` to `endpoint` and return the endpoint actually bound (port 0 resolved)."""
    sock.bind(endpoint)
    last = sock.getsockopt(zmq.LAST_ENDPOINT)
    return last.decode() if isinstance(last, bytes) else last


def _poll(sock: zmq.Socket, deadline: float) -> bool:
    remaining = deadline - time.monotonic()
    return remaining > 0 and bool(sock.poll(math.ceil(remaining * 1000), zmq.POLLIN))


@dataclass
class Incoming:
    """A message the controller received: who sent it, and whether it awaits a reply."""

    sender: bytes
    msg: dict
    request_id: bytes | None  # None for one-way notes

    @property
    def wants_reply(self) -> bool:
        return self.request_id is not None


class _Endpoint:
    """A socket owner: close() (linger 0) and the context-manager protocol."""

    _sock: zmq.Socket

    def close(self):
        self._sock.close(linger=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ControlServer(_Endpoint):
    """The controller's end: receives requests and notes from workers, replies, broadcasts.

    Args:
      endpoint: zmq endpoint to bind ("tcp://127.0.0.1:0" picks a free port; see `.endpoint`).
    """

    def __init__(self, endpoint: str = "tcp://127.0.0.1:0", *, context: zmq.Context | None = None):
        self._sock = make_socket(context or zmq.Context.instance(), zmq.ROUTER,
                                 ROUTER_MANDATORY=1, ROUTER_HANDOVER=1)
        try:
            self.endpoint = bind_endpoint(self._sock, endpoint)
        except zmq.ZMQError as e:
            self._sock.close()
            raise ControlError(f"cannot bind the control server to {endpoint!r}: {e}") from e
        self.peers: dict[bytes, float] = {}  # identity -> time.monotonic() of its last message

    def recv(self, timeout: float) -> Incoming:
        """Next valid message from any worker; raises ControlTimeout after `timeout` seconds.
        Malformed messages are answered with an error note (requests) and skipped."""
        deadline = time.monotonic() + timeout
        while _poll(self._sock, deadline):
            frames = self._sock.recv_multipart(zmq.NOBLOCK)
            if len(frames) != 4 or frames[1] not in (_REQ, _NOTE):
                continue  # not one of our clients
            sender, kind, request_id, payload = frames
            self.peers[sender] = time.monotonic()
            try:
                msg = decode(payload)
            except ProtocolError as e:
                if kind == _REQ:
                    self._send(sender, _REP, request_id, message("error", reason=str(e)))
                continue
            return Incoming(sender, msg, request_id if kind == _REQ else None)
        raise ControlTimeout(f"no control message within {timeout:.3g} s")

    def _send(self, identity: bytes, kind: bytes, request_id: bytes, msg: Mapping) -> bool:
        try:
            self._sock.send_multipart([identity, kind, request_id, encode(msg)], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as e:
            if e.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):  # gone, or not draining its queue
                self.peers.pop(identity, None)
                return False
            raise

    def reply(self, incoming: Incoming, msg: Mapping) -> bool:
        """Answer a request; False if the requester is gone."""
        if not incoming.wants_reply:
            raise ControlError(f"{incoming.msg['type']!r} from {incoming.sender!r} was a note, not a request")
        return self._send(incoming.sender, _REP, incoming.request_id, msg)

    def send(self, identity: bytes, msg: Mapping) -> bool:
        """One-way message to one worker; False if it is not connected (or not draining)."""
        return self._send(identity, _NOTE, b"", msg)

    def broadcast(self, msg: Mapping, identities: Iterable[bytes] | None = None) -> list[bytes]:
        """Send `msg` to `identities` (default: every worker heard from); returns the unreachable ones."""
        validate(msg)
        targets = list(self.peers if identities is None else identities)
        return [identity for identity in targets if not self.send(identity, msg)]



class ControlClient(_Endpoint):
    """A worker's end: requests with timeouts, one-way notes, and the controller's broadcasts.

    Args:
      endpoint: the controller's endpoint.
      identity: unique name of this worker (e.g. b"rank-3"); a restarted worker may reuse it.
    """

    def __init__(self, endpoint: str, identity: bytes | str, *, context: zmq.Context | None = None):
        identity = identity.encode() if isinstance(identity, str) else identity
        if not isinstance(identity, bytes) or not identity or identity.startswith(b"\0"):
            raise ValueError(f"identity must be a non-empty name not starting with NUL, got {identity!r}")
        self.identity = identity
        self._sock = make_socket(context or zmq.Context.instance(), zmq.DEALER, IDENTITY=identity)
        try:
            self._sock.connect(endpoint)
        except zmq.ZMQError as e:
            self._sock.close()
            raise ControlError(f"cannot connect to the controller at {endpoint!r}: {e}") from e
        self._ids = itertools.count(1)
        self._notes: list[dict] = []

    def _send(self, kind: bytes, request_id: bytes, msg: Mapping):
        try:
            self._sock.send_multipart([kind, request_id, encode(msg)], zmq.NOBLOCK)
        except zmq.Again as e:
            raise ControlError("the controller is not draining its queue (send buffer full)") from e

    def notify(self, msg: Mapping):
        """One-way message to the controller."""
        self._send(_NOTE, b"", msg)

    def _recv_frames(self, deadline: float):
        while _poll(self._sock, deadline):
            frames = self._sock.recv_multipart(zmq.NOBLOCK)
            if len(frames) == 3 and frames[0] in (_REP, _NOTE):
                return frames
        return None

    def request(self, msg: Mapping, timeout: float) -> dict:
        """Send `msg` and return the controller's reply; ControlTimeout after `timeout` seconds.
        An "error" reply raises ControlError. Notes arriving meanwhile are kept for `recv`."""
        request_id = str(next(self._ids)).encode()
        self._send(_REQ, request_id, msg)
        deadline = time.monotonic() + timeout
        while (frames := self._recv_frames(deadline)) is not None:
            kind, got_id, payload = frames
            if kind == _NOTE:
                self._notes.append(decode(payload))
            elif got_id == request_id:
                reply = decode(payload)
                if reply["type"] == "error":
                    raise ControlError(f"controller rejected {msg['type']!r}: {reply['reason']}")
                return reply
            # else: the late reply of an earlier, timed-out request
        raise ControlTimeout(f"no reply to {msg['type']!r} within {timeout:.3g} s")

    def recv(self, timeout: float) -> dict:
        """Next one-way message (e.g. an epoch broadcast) from the controller; ControlTimeout after
        `timeout` seconds."""
        if self._notes:
            return self._notes.pop(0)
        deadline = time.monotonic() + timeout
        while (frames := self._recv_frames(deadline)) is not None:
            if frames[0] == _NOTE:
                return decode(frames[2])
        raise ControlTimeout(f"no message from the controller within {timeout:.3g} s")

