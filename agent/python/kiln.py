"""Kiln's metrics API for training scripts. Standard library only.

Under Kiln (the agent puts this module on PYTHONPATH) every point goes to the agent, which
stores it with the run:

    import kiln
    kiln.log("loss", 0.25, step=3)
    kiln.log_many({"loss": 0.25, "accuracy": 0.91}, step=3)
    open(os.path.join(kiln.outputs_dir(), "model.json"), "w")

Outside Kiln the same calls print the point to stderr, so the script runs unchanged.
"""

import json
import math
import os
import socket
import sys
import threading

__all__ = ["log", "log_many", "outputs_dir", "run_id", "active"]

_lock = threading.Lock()
_sock = None
_pid = None


def active():
    """True when the script runs under Kiln."""
    return bool(os.environ.get("KILN_METRICS_SOCKET"))


def run_id():
    """The Kiln run id, or None outside Kiln."""
    return os.environ.get("KILN_RUN_ID")


def outputs_dir():
    """The folder whose content Kiln uploads when the run ends (`kiln download RUN`)."""
    path = os.environ.get("KILN_OUTPUTS_DIR", "outputs")
    os.makedirs(path, exist_ok=True)
    return path


def _connection():
    global _sock, _pid
    # A forked child (e.g. a DataLoader worker) must not share the parent's socket.
    if _sock is None or _pid != os.getpid():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(os.environ["KILN_METRICS_SOCKET"])
        _sock, _pid = sock, os.getpid()
    return _sock


def _check(name, value, step):
    if not isinstance(name, str) or not name:
        raise ValueError("kiln.log: name must be a non-empty string")
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise ValueError("kiln.log: %s=%r is not a finite number" % (name, value))
    if step is not None:
        step = int(step)
    return value, step


def log(name, value, step=None):
    """Record one value of the metric `name` (a number), optionally at training `step`."""
    log_many({name: value}, step=step)


def log_many(metrics, step=None):
    """Record several metrics at once: kiln.log_many({"loss": l, "acc": a}, step=epoch)."""
    points = []
    rank = os.environ.get("RANK")
    for name, value in metrics.items():
        value, step_ = _check(name, value, step)
        point = {"name": name, "value": value, "step": step_}
        if rank is not None and rank.isdigit():
            # Distributed runs: which rank logged it (`kiln metrics RUN --rank N`).
            point["rank"] = int(rank)
        points.append(point)
    if not active():
        for p in points:
            at = "" if p["step"] is None else " step=%d" % p["step"]
            print("[kiln] %s=%g%s" % (p["name"], p["value"], at), file=sys.stderr)
        return
    data = "".join(json.dumps(p) + "\n" for p in points).encode()
    with _lock:
        try:
            _connection().sendall(data)
        except OSError:
            # The agent went away; reconnect once, then give up quietly on this point.
            global _sock
            _sock = None
            try:
                _connection().sendall(data)
            except OSError as error:
                print("[kiln] could not record metrics: %s" % error, file=sys.stderr)
