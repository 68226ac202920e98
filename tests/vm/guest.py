"""Runs the integration suite on the running kernel and writes what happened to OUT:
junit.xml, pytest.log and summary.json (kernel, features probed, attach mode, counts,
failures). Started by tests/vm/guest.sh inside a virtme-ng guest, or directly on the
host for the `host` row of tools/vm_matrix.py. The summary is the only result: the
guest's exit code does not always reach the host.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def probe_features() -> dict:
    """The agent's own probe, from this checkout's source (what the agent runs)."""
    code = ("import json; from ei_ebpf_agent.ebpf import features; "
            "print(json.dumps(features.probe().as_dict()))")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, check=False, timeout=600)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["probe failed"])[-1]}
    return json.loads(done.stdout)


def failure_line(element: ET.Element) -> str:
    """One line saying why: the message, or the exception a quoted traceback ends with."""
    def lines(text: str | None) -> list[str]:
        return [line.strip() for line in (text or "").splitlines() if line.strip()]

    first = (lines(element.get("message")) or lines(element.text) or [""])[0]
    if "Traceback" in first:  # a subprocess's traceback quoted in an assertion
        errors = [line for line in lines(element.text)
                  if re.match(r"^(E\s+)?[\w.]*(Error|Exception): ", line)]
        if errors:
            return errors[-1].removeprefix("E").strip()[:400]
    return first[:400]


def junit_counts(path: Path) -> tuple[dict, list[dict]]:
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    if not path.exists():
        return counts, failures
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "errors"}.get(child.tag, "skipped")
                if outcome != "skipped":
                    failures.append({"test": name, "outcome": outcome,
                                     "message": failure_line(child)})
                break
        counts[outcome] += 1
    return counts, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--label", default=platform.release())
    parser.add_argument("--subset", choices=("vm", "all"), default="vm")
    parser.add_argument("--where", default="vm", help="vm or host (recorded)")
    parser.add_argument("--strict-skips", action="store_true",
                        help="a skip fails the run (EI_STRICT_SKIPS=1, as in CI)")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"guest: kernel {platform.release()}, python {sys.version.split()[0]}", flush=True)

    features = probe_features()
    print(f"guest: features {json.dumps(features)}", flush=True)

    junit = out / "junit.xml"
    unmatched = out / "unmatched.txt"
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-ra",
               f"--rootdir={ROOT}", "-c", str(ROOT / "pyproject.toml"),
               "-o", "junit_family=xunit2", f"--junitxml={junit}"]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    if args.strict_skips:  # virtme-ng does not pass the host's environment to the guest
        env["EI_STRICT_SKIPS"] = "1"
    if args.subset == "vm":
        command += ["-p", "vm_subset"]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
        env["EI_VM_UNMATCHED"] = str(unmatched)
    command += args.pytest_args or [str(ROOT / "tests" / "integration")]
    print("guest: " + " ".join(command), flush=True)
    with open(out / "pytest.log", "w", encoding="utf-8") as log:
        # cwd: a writable directory (the guest's checkout is read-only, and tools such as
        # trafgen drop temporary files in their working directory)
        process = subprocess.Popen(command, cwd=tempfile.gettempdir(), env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            log.flush()
        returncode = process.wait()

    counts, failures = junit_counts(junit)
    stale = unmatched.read_text().split() if unmatched.exists() else []
    summary = {
        "label": args.label,
        "kernel": platform.release(),
        "where": args.where,
        "subset": args.subset,
        "features": features,
        "attach_mode": features.get("attach_mode"),
        "counts": counts,
        "failures": failures,
        "unmatched_patterns": stale,
        "pytest_returncode": returncode,
        "suite_seconds": round(time.monotonic() - started, 1),
        "ok": returncode == 0 and not stale and counts["passed"] > 0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"guest: summary {json.dumps(counts)} ok={summary['ok']}", flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
