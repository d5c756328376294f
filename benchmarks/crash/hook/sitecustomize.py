"""Imported by every Python process of a crash-test run: pauses one chosen atomic write.

Active only when FLEXMOE_CRASH_AT is set: the NTH write (in one process) whose path contains
that text writes its temporary file, leaves a marker naming the file, and then waits, so the
crash test can SIGKILL the run while the write is under way.
"""

import os

if os.environ.get("FLEXMOE_CRASH_AT"):
    import time
    from pathlib import Path

    import flexmoe.io

    _original = flexmoe.io.atomic_write
    _seen = [0]

    def _paused(path, write):
        if os.environ["FLEXMOE_CRASH_AT"] not in str(path):
            return _original(path, write)
        _seen[0] += 1
        if _seen[0] != int(os.environ.get("FLEXMOE_CRASH_NTH", "1")):
            return _original(path, write)

        def write_then_wait(temporary):
            write(temporary)
            Path(os.environ["FLEXMOE_CRASH_MARKER"]).write_text(f"{temporary} -> {path}")
            time.sleep(600)

        return _original(path, write_then_wait)

    flexmoe.io.atomic_write = _paused
