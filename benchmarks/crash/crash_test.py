"""Kill `flexmoe run` with SIGKILL at chosen and random points, resume it, compare the results.

For each scenario the run is killed (the `flexmoe run` process alone, as `kill -9 PID` would),
every process it started (Ray's included) is watched until gone (60 s at most), the run is
resumed with `flexmoe run --resume`, and its results.json is compared with an uninterrupted
run's. Chosen points pause an atomic write midway (hook/sitecustomize.py, injected through
PYTHONPATH into every process of the run, Ray workers included) and kill the run there: a
client's personal state write and the server's checkpoint writes. Random points kill it after
a random delay.

    .venv/bin/python benchmarks/crash/crash_test.py [--out benchmarks/results/crash]

Writes OUT/crash_test.json and prints a summary. Takes about 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOOK = Path(__file__).parent / "hook"
SETTINGS = [
    "--model", "tiny", "--clients", "2", "--rounds", "3", "--local-steps", "1",
    "--max-train", "16", "--max-test", "4", "--max-new-tokens", "8",
]  # fmt: skip
CHOSEN = [  # (name, text in the path of the write to pause, which such write in one process)
    ("client state write, round 2", ".round-0002.tmp/personal.safetensors", 1),
    ("server checkpoint arrays, round 2", "shared-round-0002", 1),
    ("server rounds.json, at the start (round 0)", "rounds.json", 1),
    ("server rounds.json, round 1", "rounds.json", 2),
    ("server checkpoint.json, round 2", "checkpoint.json", 3),  # round 0, 1, then 2
]
RANDOM_KILLS = 2
ORPHAN_WAIT_S = 60


def flexmoe(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "flexmoe", "run", *arguments]


def processes_of(marker: Path) -> dict[int, str]:
    """Every live process of one run (each carries its marker path in its environment)."""
    tag = f"FLEXMOE_CRASH_MARKER={marker}".encode()
    found = {}
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if tag not in environ.read_bytes().split(b"\0"):
                continue
            status = (environ.parent / "status").read_text()
            cmdline = (environ.parent / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if "State:\tZ" not in status:
            found[int(environ.parent.name)] = cmdline.decode(errors="replace")[:160]
    return found


def results_of(folder: Path) -> dict:
    results = json.loads((folder / "results.json").read_text())
    return {
        "mean_rouge_l": results["mean_rouge_l"],
        "mean_test_loss": results["mean_test_loss"],
        "bytes_up": results["comm"]["bytes_up"],
        "clients": [(c["rouge_l"], c["test_loss"]) for c in results["clients"]],
    }


def same(a: dict, b: dict) -> bool:
    close = abs(a["mean_test_loss"] - b["mean_test_loss"]) <= 1e-6
    losses = all(abs(x[1] - y[1]) <= 1e-6 for x, y in zip(a["clients"], b["clients"], strict=True))
    rouge = [x[0] for x in a["clients"]] == [y[0] for y in b["clients"]]
    return close and losses and rouge and a["bytes_up"] == b["bytes_up"]


def leftovers(folder: Path) -> list[str]:
    """Temporary files and folders, and locks, left anywhere in a run folder."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if p.name != ".gitignore")


def kill_run(folder: Path, env: dict[str, str], marker: Path, delay: float | None) -> dict:
    """Start a run into ``folder``, SIGKILL it when ``marker`` appears or after ``delay``, and
    watch its processes (Ray's included) go; what happened."""
    started = time.monotonic()
    process = subprocess.Popen(
        flexmoe("--out", str(folder), *SETTINGS),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while process.poll() is None:
        if marker.exists() or (delay and time.monotonic() - started > delay):
            break
        time.sleep(0.05)
    if process.poll() is not None:
        return {"killed": False, "exit_status": process.returncode}
    paused = marker.read_text() if marker.exists() else None
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = time.monotonic() - started
    killed = time.monotonic()
    while (orphans := processes_of(marker)) and time.monotonic() - killed < ORPHAN_WAIT_S:
        time.sleep(1)
    return {
        "killed": True,
        "killed_after_s": round(killed_at, 1),
        "paused_write": paused,
        "saved_round": _saved_round(folder),
        "processes_gone_after_s": round(time.monotonic() - killed, 1),
        "processes_left_after_60_s": sorted(orphans.values()),
    }


def _saved_round(folder: Path) -> int | None:
    checkpoint = folder / "checkpoint.json"
    return json.loads(checkpoint.read_text())["round"] if checkpoint.is_file() else None


def resume(folder: Path) -> subprocess.CompletedProcess:
    command = (
        flexmoe("--resume", str(folder))
        if (folder / "checkpoint.json").is_file()
        else (flexmoe("--out", str(folder), *SETTINGS))
    )
    return subprocess.run(command, capture_output=True, text=True, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/crash"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="flexmoe-crash-"))
    paths = [str(HOOK), os.environ.get("PYTHONPATH", "")]
    base_env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    started = time.monotonic()
    subprocess.run(flexmoe("--out", str(work / "reference"), *SETTINGS), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    reference_s = time.monotonic() - started
    reference = results_of(work / "reference")
    rng = random.Random(args.seed)
    scenarios = [(name, {"FLEXMOE_CRASH_AT": text, "FLEXMOE_CRASH_NTH": str(nth)}, None)
                 for name, text, nth in CHOSEN]  # fmt: skip
    scenarios += [  # somewhere between its start-up and its end, as long as a run takes here
        (f"random kill {i + 1}", {}, rng.uniform(0.15, 0.9) * reference_s)
        for i in range(RANDOM_KILLS)
    ]
    report = []
    for index, (name, hook_env, delay) in enumerate(scenarios):
        folder, marker = work / f"run-{index}", work / f"marker-{index}"
        env = {**base_env, **hook_env, "FLEXMOE_CRASH_MARKER": str(marker)}
        outcome = {"scenario": name, **kill_run(folder, env, marker, delay)}
        resumed = resume(folder)
        outcome["resume_exit_status"] = resumed.returncode
        if resumed.returncode == 0:
            outcome["results_equal_uninterrupted"] = same(results_of(folder), reference)
        else:
            outcome["resume_error"] = resumed.stderr.strip().splitlines()[-1:]
        outcome["leftovers"] = leftovers(folder)
        report.append(outcome)
        print(json.dumps(outcome), flush=True)
    summary = {
        "settings": SETTINGS,
        "reference": reference,
        "reference_wall_s": round(reference_s, 1),
        "scenarios": report,
        "all_killed": all(o["killed"] for o in report),
        "all_equal": all(o.get("results_equal_uninterrupted") for o in report),
        "no_leftovers": not any(o["leftovers"] for o in report),
        "no_orphans": not any(o.get("processes_left_after_60_s") for o in report),
        "wall_s": round(time.monotonic() - started),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "crash_test.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(work)
    verdicts = ("all_killed", "all_equal", "no_leftovers", "no_orphans")
    print(", ".join(f"{v}: {summary[v]}" for v in verdicts), "->", args.out / "crash_test.json")
    sys.exit(0 if all(summary[v] for v in verdicts) else 1)


if __name__ == "__main__":
    main()
