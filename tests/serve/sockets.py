"""The TCP sockets a process tree listens on, read from /proc (psutil is not a dependency); one HTTP answer
read off a raw socket."""

import ipaddress
import json
import os
import socket
import time
from pathlib import Path


def process_tree(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo += children.get(pid, [])
    return tree


def socket_inodes(pids) -> dict[str, int]:
    inodes = {}
    for pid in pids:
        try:
            for fd in os.scandir(f"/proc/{pid}/fd"):
                target = os.readlink(fd.path)
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    return inodes


def _address(hex_addr: str) -> ipaddress._BaseAddress:
    raw = bytes.fromhex(hex_addr)
    # /proc/net/tcp* print each 32-bit word of the address in host (little-endian) order
    return ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))


def listening(root: int) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket listening in the process tree of `root`."""
    inodes = socket_inodes(process_tree(root))
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # state 0A: LISTEN
                host, port = cols[1].split(":")
                addr = _address(host)
                if getattr(addr, "ipv4_mapped", None):
                    addr = addr.ipv4_mapped
                found.append((str(addr), int(port, 16), inodes[cols[9]]))
    return found


def read_answer(sock, timeout=5.0):
    """(status, JSON body or raw bytes, seconds until the server closed) of the answer on `sock`, read until
    the server closes the connection (or `timeout` passes)."""
    sock.settimeout(timeout)
    t0, data = time.monotonic(), b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1]) if head else None
    try:
        body = json.loads(body)
    except ValueError:
        pass
    return status, body, time.monotonic() - t0
