"""Several "hosts" on one machine: network namespaces joined by a bridge (a test harness; production
code never imports it).

    with NetnsHosts(3) as hosts:                 # hosts 0..2, each a namespace with one veth to a bridge
        p = hosts.popen(1, [sys.executable, ...])  # runs inside host 1's namespace
        hosts.cut(1); hosts.restore(1)            # its link down / up (a partition of that host)
        NetnsHosts.attach(hosts.names).cut(1)     # the same from another process (any namespace)
        hosts.kill(1)                             # SIGKILL every process of host 1

Addresses are 10.<a>.<b>.<i + 1>/24 in a subnet drawn from this process's pid, so that runs side by
side do not collide; the subnet exists only on the bridge and inside the namespaces (nothing is
routed, the root namespace has no address on it). Everything is torn down by name and by pid on exit,
also when the test failed: the processes of each namespace are killed, then the namespaces and the
bridge deleted. Needs root and `ip` (iproute2); `available()` says why not where they are missing."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time


def _ip(*args, check=True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def available() -> str | None:
    """None when namespaces can be made here, else the reason."""
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    name = f"jemprobe{os.getpid()}"
    r = _ip("netns", "add", name, check=False)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


class NetnsHosts:
    def __init__(self, n: int):
        tag = os.getpid() % 100_000
        self.n = n
        self.bridge = f"jb{tag}"
        self.names = [f"jem{tag}h{i}" for i in range(n)]
        self.veths = [f"jv{tag}h{i}" for i in range(n)]        # the root-side end of each host's link
        self.subnet = f"10.{100 + tag % 100}.{tag // 100 % 250}"
        self.addrs = [f"{self.subnet}.{i + 1}" for i in range(n)]
        self.procs: list[subprocess.Popen] = []

    @classmethod
    def attach(cls, names: list[str]) -> "NetnsHosts":
        """The hosts named (made by another process's NetnsHosts): kill/cut/restore only, no teardown."""
        self = cls.__new__(cls)
        self.n, self.names, self.procs = len(names), list(names), []
        return self

    def __enter__(self) -> "NetnsHosts":
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("link", "set", self.bridge, "up")
            for name, veth, addr in zip(self.names, self.veths, self.addrs):
                _ip("netns", "add", name)
                _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
                _ip("link", "set", veth, "master", self.bridge, "up")
                _ip("-n", name, "addr", "add", f"{addr}/24", "dev", "eth0")
                _ip("-n", name, "link", "set", "eth0", "up")
                _ip("-n", name, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def popen(self, host: int, argv: list[str], **kw) -> subprocess.Popen:
        """Starts argv inside `host`'s namespace (its own process group, so kill() reaches its children)."""
        p = subprocess.Popen(["ip", "netns", "exec", self.names[host], *argv], start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def pids(self, host: int) -> list[int]:
        r = _ip("netns", "pids", self.names[host], check=False)
        return [int(x) for x in r.stdout.split()]

    def kill(self, host: int):
        """SIGKILL every process of `host` at once (a host that crashed)."""
        for pid in self.pids(host):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def cut(self, host: int):
        """`host` loses its link: nothing in or out until restore() (from any namespace: `ip -n`)."""
        _ip("-n", self.names[host], "link", "set", "eth0", "down")

    def restore(self, host: int):
        _ip("-n", self.names[host], "link", "set", "eth0", "up")

    def close(self):
        for host in range(self.n):
            self.kill(host)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(self.pids(h) for h in range(self.n)) and time.monotonic() < deadline:
            time.sleep(0.05)
        for name in self.names:
            _ip("netns", "del", name, check=False)        # deletes its end of the veth too
        for veth in self.veths:
            _ip("link", "del", veth, check=False)
        _ip("link", "del", self.bridge, check=False)
