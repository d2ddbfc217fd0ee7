"""Two network namespaces joined by a veth pair: two "hosts" on one machine for multi-node tests.

    with two_hosts() as (a, b):          # raises NamespacesUnavailable (tests skip) where it cannot
        subprocess.run(a.argv(["python", "-m", ...]), env={**os.environ, **a.env()})

Each host gets its own namespace, veth end, address in 10.231.7.0/24 (private; only the two veth ends
carry it, nothing routes out), hostname (`unshare --uts` per command) and /etc/netns/<ns>/hosts naming
both hosts. Teardown SIGKILLs whatever still runs inside the namespaces (only processes started in
them), deletes the namespaces (the veth pair goes with them) and the hosts files.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

SUBNET = "10.231.7"


class NamespacesUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class Host:
    ns: str  # network namespace name
    ifname: str  # its veth end
    addr: str
    hostname: str

    def argv(self, cmd: list[str]) -> list[str]:
        """Run cmd inside this host: its network namespace, a UTS namespace with its hostname."""
        return ["ip", "netns", "exec", self.ns, "unshare", "--uts", "sh", "-c",
                f'hostname {self.hostname} && exec "$@"', "sh", *cmd]

    def env(self) -> dict[str, str]:
        return {"GLOO_SOCKET_IFNAME": self.ifname}


def _ip(*args: str) -> None:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if p.returncode:
        raise subprocess.CalledProcessError(p.returncode, ["ip", *args], p.stdout, p.stderr)


def _kill_inside(ns: str) -> None:
    p = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30)
    for pid in p.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


@contextlib.contextmanager
def two_hosts(tag: str | None = None, subnet: str = SUBNET) -> Iterator[tuple[Host, Host]]:
    tag = tag or str(os.getpid() % 100000)
    hosts = (Host(f"mf{tag}a", f"mfv{tag}a", f"{subnet}.1", f"mf-{tag}-a"),
             Host(f"mf{tag}b", f"mfv{tag}b", f"{subnet}.2", f"mf-{tag}-b"))
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        raise NamespacesUnavailable("`ip` (iproute2) or `unshare` (util-linux) is not installed")
    made: list[Host] = []
    try:
        for h in hosts:
            try:
                _ip("netns", "add", h.ns)
            except subprocess.CalledProcessError as e:
                raise NamespacesUnavailable(f"`ip netns add {h.ns}` failed (needs root / CAP_SYS_ADMIN): "
                                            f"{e.stderr.strip()}") from None
            made.append(h)
            etc = Path("/etc/netns") / h.ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text("127.0.0.1 localhost\n" +
                                       "".join(f"{x.addr} {x.hostname}\n" for x in hosts))
        a, b = hosts
        _ip("link", "add", a.ifname, "type", "veth", "peer", "name", b.ifname)
        for h in hosts:
            _ip("link", "set", h.ifname, "netns", h.ns)
            _ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", h.ifname)
            _ip("-n", h.ns, "link", "set", h.ifname, "up")
            _ip("-n", h.ns, "link", "set", "lo", "up")
        yield a, b
    finally:
        for h in made:
            _kill_inside(h.ns)
            with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
                _ip("netns", "del", h.ns)
            shutil.rmtree(Path("/etc/netns") / h.ns, ignore_errors=True)
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            _ip("link", "del", hosts[0].ifname)  # only if it never left the root namespace
