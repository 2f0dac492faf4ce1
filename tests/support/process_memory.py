"""The peak memory of a running gateway's processes (VmHWM from /proc), for the
hostile-input suite (the bombs themselves: tests/support/bombs.py)."""

from __future__ import annotations

from pathlib import Path


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of a process: the most resident memory it ever had."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmHWM for process {pid}")


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children...)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def gateway_processes(serve_pid: int) -> dict[int, str]:
    """The processes of a running `serve`, each named by its component (node, worker, api;
    Celery's pool processes are "worker" too)."""
    named = {}
    for pid in descendants(serve_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv if a]
        component = next((w for w in reversed(words) if w in ("node", "worker", "api")), None)
        if component is None and any("celery" in w or "gateway" in w for w in words):
            component = "worker"
        if component is not None:
            named[pid] = component
    return named


def peaks(serve_pid: int) -> dict[int, tuple[str, int]]:
    """(component, VmHWM) of each process of a running `serve`."""
    result = {}
    for pid, component in gateway_processes(serve_pid).items():
        try:
            result[pid] = (component, peak_rss_bytes(pid))
        except (OSError, ValueError):
            continue  # ended meanwhile
    return result


__all__ = ["descendants", "gateway_processes", "peak_rss_bytes", "peaks"]
