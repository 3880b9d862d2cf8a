"""Control-plane message layer: validation, request/reply with timeouts, broadcasts to worker processes."""
import threading
import time

import pytest

msgpack = pytest.importorskip("msgpack", reason="needs the elastic extras: pip install 'jax-elastic-moe[elastic]'")
pytest.importorskip("zmq", reason="needs the elastic extras: pip install 'jax-elastic-moe[elastic]'")

from jax_elastic_moe.runtime.control import (ControlClient, ControlError, ControlServer,  # noqa: E402
                                             ControlTimeout, ProtocolError, decode, encode, message,
                                             register_message, validate)
from runtime_support import bounded_test, children, control_worker  # noqa: E402,F401 (fixtures)


def test_message_validation_names_the_problem():
    assert message("ack") == {"type": "ack"}
    msg = message("suspect", rank=1, epoch=3, suspects=[2], reason="write failed", extra=True)
    assert decode(encode(msg)) == msg
    with pytest.raises(ProtocolError, match="missing field.*'reason'"):
        message("suspect", rank=1, epoch=3, suspects=[2])
    with pytest.raises(ProtocolError, match="unknown message type 'nope'"):
        message("nope")
    with pytest.raises(ProtocolError, match="must be a dict"):
        validate(["type", "ack"])
    with pytest.raises(ProtocolError, match="undecodable"):
        decode(b"\xc1garbage")
    with pytest.raises(ProtocolError, match="must be a dict"):
        decode(msgpack.packb(7))
    with pytest.raises(ProtocolError, match="cannot encode"):
        encode(message("error", reason=object()))


def test_register_message_declares_types_once():
    register_message("test_ping", ["n"])
    register_message("test_ping", ["n"])  # same declaration again is fine
    assert message("test_ping", n=1)["n"] == 1
    with pytest.raises(ValueError, match="already declared"):
        register_message("test_ping", ["m"])


@pytest.fixture
def server():
    with ControlServer() as srv:
        yield srv


def _serve(srv: ControlServer, replies: int, stop: threading.Event, delay: float = 0.0):
    """Answer `replies` requests with ack(echo=...), sleeping `delay` before each reply."""
    answered = 0
    while answered < replies and not stop.is_set():
        try:
            incoming = srv.recv(timeout=0.1)
        except ControlTimeout:
            continue
        if incoming.wants_reply:
            time.sleep(delay)
            srv.reply(incoming, message("ack", echo=incoming.msg.get("n")))
            answered += 1


def test_request_reply_and_notes(server):
    stop = threading.Event()
    thread = threading.Thread(target=_serve, args=(server, 3, stop), daemon=True)
    thread.start()
    try:
        with ControlClient(server.endpoint, "rank-0") as client:
            for n in range(3):
                assert client.request(message("ack", n=n), timeout=5) == {"type": "ack", "echo": n}
    finally:
        stop.set()
        thread.join(5)
    assert b"rank-0" in server.peers


def test_request_times_out_and_late_reply_is_dropped(server):
    with ControlClient(server.endpoint, "rank-1") as client:
        start = time.monotonic()
        with pytest.raises(ControlTimeout, match="no reply to 'ack'"):
            client.request(message("ack", n=1), timeout=0.3)
        elapsed = time.monotonic() - start
        assert 0.3 <= elapsed < 0.8
        # The server answers the first request late, then the second in time: the client must
        # return the second reply, not the stale first one.
        first = server.recv(timeout=2)
        server.reply(first, message("ack", echo=first.msg["n"]))
        stop = threading.Event()
        thread = threading.Thread(target=_serve, args=(server, 1, stop), daemon=True)
        thread.start()
        try:
            assert client.request(message("ack", n=2), timeout=5)["echo"] == 2
        finally:
            stop.set()
            thread.join(5)


def test_error_reply_and_malformed_request(server):
    with ControlClient(server.endpoint, "rank-2") as client:
        stop = threading.Event()

        def reject():
            incoming = server.recv(timeout=5)
            server.reply(incoming, message("error", reason="rank 2 is not in epoch 4"))

        thread = threading.Thread(target=reject, daemon=True)
        thread.start()
        with pytest.raises(ControlError, match="rank 2 is not in epoch 4"):
            client.request(message("register", rank=2, address={}), timeout=5)
        thread.join(5)
        # a malformed payload is answered with an error by the server itself
        client._sock.send_multipart([b"req", b"99", b"\xc1"])
        with pytest.raises(ControlTimeout):
            server.recv(timeout=0.3)  # the bad request is not delivered to the controller
        kind, request_id, payload = client._sock.recv_multipart()
        assert (kind, request_id) == (b"rep", b"99") and "undecodable" in decode(payload)["reason"]
        stop.set()


def test_notes_arriving_during_a_request_are_kept(server):
    with ControlClient(server.endpoint, "rank-3") as client:
        client.notify(message("ack", n=0))
        hello = server.recv(timeout=5)
        assert not hello.wants_reply
        with pytest.raises(ControlError, match="was a note"):
            server.reply(hello, message("ack"))

        def serve():
            incoming = server.recv(timeout=5)
            server.send(incoming.sender, message("epoch", epoch=7, active=[1, 1], peers={}))
            server.reply(incoming, message("ack", echo=1))

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        assert client.request(message("ack", n=1), timeout=5)["echo"] == 1
        thread.join(5)
        assert client.recv(timeout=0.1)["epoch"] == 7
        with pytest.raises(ControlTimeout):
            client.recv(timeout=0.1)


def test_send_to_unknown_worker_reports_unreachable(server):
    assert server.send(b"rank-9", message("shutdown")) is False
    assert server.broadcast(message("shutdown"), [b"rank-8", b"rank-9"]) == [b"rank-8", b"rank-9"]
    with pytest.raises(ValueError, match="identity"):
        ControlClient(server.endpoint, b"")


def test_broadcast_epochs_to_worker_processes(server, children):
    procs = [children.start(control_worker, server.endpoint, rank, 30.0) for rank in range(3)]
    registered = {}
    deadline = time.monotonic() + 30
    while len(registered) < 3 and time.monotonic() < deadline:
        incoming = server.recv(timeout=deadline - time.monotonic())
        assert incoming.msg["type"] == "register"
        registered[incoming.msg["rank"]] = incoming.sender
        server.reply(incoming, message("ack"))
    assert sorted(registered) == [0, 1, 2]
    assert server.broadcast(message("epoch", epoch=1, active=[1, 1, 1], peers={})) == []
    acks = {server.recv(timeout=10).msg["rank"] for _ in range(3)}
    assert acks == {0, 1, 2}

    procs[2].kill()
    procs[2].join(5)
    # the controller learns the disconnect asynchronously; within a second a send must fail
    deadline = time.monotonic() + 5
    unreachable = []
    while time.monotonic() < deadline and not unreachable:
        unreachable = server.broadcast(message("epoch", epoch=2, active=[1, 1, 0], peers={}),
                                       [registered[2]])
        time.sleep(0.05)
    assert unreachable == [registered[2]]
    assert server.broadcast(message("epoch", epoch=3, active=[1, 1, 0], peers={}),
                            [registered[0], registered[1]]) == []
    acks = [server.recv(timeout=10).msg for _ in range(2)]
    assert sorted((a["rank"], a["epoch"]) for a in acks) == [(0, 3), (1, 3)]
    assert server.broadcast(message("shutdown"), [registered[0], registered[1]]) == []
    for proc in procs[:2]:
        proc.join(10)
        assert proc.exitcode == 0
