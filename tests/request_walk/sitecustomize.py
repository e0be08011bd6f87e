"""Imported at start-up by every Python process of a `bentoml serve` that tests/test_layout.py starts with
this directory on PYTHONPATH. With BENTOCHAT_TRACE_DIR set, it records which files under
BENTOCHAT_TRACE_ROOT (the project, not its .venv) run Python code while a window is open: SIGUSR1 opens
one, SIGUSR2 closes it and writes the files, relative to the root, to ``<pid>.json`` in that directory.
A profile function on every thread from start-up: slower, which is fine for one request."""

import json
import os
import signal
import sys
import threading

TRACE_DIR, ROOT = os.environ.get("BENTOCHAT_TRACE_DIR"), os.environ.get("BENTOCHAT_TRACE_ROOT")

if TRACE_DIR and ROOT:
    _root = os.path.realpath(ROOT) + os.sep
    _skipped = (os.path.join(_root, ".venv") + os.sep, os.path.join(_root, "tests") + os.sep)
    _codes: set = set()
    _window = {"open": False}

    def _profile(frame, event, arg):
        if _window["open"] and event == "call":
            _codes.add(frame.f_code.co_filename)

    def _open(*_):
        _codes.clear()
        _window["open"] = True

    def _close(*_):
        _window["open"] = False
        paths = [os.path.realpath(f) for f in list(_codes) if os.path.isabs(f)]  # not <frozen …>, <string>
        files = sorted({os.path.relpath(f, _root) for f in paths if f.startswith(_root) and not f.startswith(_skipped)})
        with open(os.path.join(TRACE_DIR, f"{os.getpid()}.json"), "w") as out:
            json.dump(files, out)

    sys.setprofile(_profile)
    threading.setprofile(_profile)
    signal.signal(signal.SIGUSR1, _open)
    signal.signal(signal.SIGUSR2, _close)
