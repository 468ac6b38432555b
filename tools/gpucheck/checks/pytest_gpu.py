"""Check ``pytest``: every gpu-marked test (pytest -m gpu tests/gpu), one row from its JUnit XML."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ..harness import FAIL, PASS, Check, Context, Row, last_error


def parse_junit(path: Path) -> dict[str, Any]:
    """Passed / failed / skipped counts, failed test ids and skip reasons from a pytest JUnit XML file."""
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    out: dict[str, Any] = {"passed": 0, "failed": [], "skipped": 0, "skip_reasons": []}
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            out["failed"].append(test_id)
        elif (skipped := case.find("skipped")) is not None:
            out["skipped"] += 1
            reason = skipped.get("message", "")
            if reason and reason not in out["skip_reasons"]:
                out["skip_reasons"].append(reason)
        else:
            out["passed"] += 1
    return out


def check_pytest(ctx: Context) -> list[Row]:
    xml = ctx.dir / "junit.xml"
    done = ctx.run("pytest", [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-p",
                              "no:cacheprovider", f"--junitxml={xml}"])
    counts = parse_junit(xml) if xml.is_file() else {}
    figures = dict(counts)
    summary = (f"{counts.get('passed', 0)} passed, {len(counts.get('failed', []))} failed, "
               f"{counts.get('skipped', 0)} skipped" + (f" ({'; '.join(counts['skip_reasons'])[:200]})"
                                                        if counts.get("skip_reasons") else ""))
    if done.rc is None:
        return [Row("pytest", FAIL, done.why(), done.seconds, figures)]
    if done.rc == 5:
        return [Row("pytest", FAIL, "no gpu-marked tests were collected", done.seconds, figures)]
    if done.rc != 0 or counts.get("failed"):
        failed = ", ".join(counts.get("failed", [])[:5]) or last_error(done.log)
        return [Row("pytest", FAIL, f"{summary}: {failed} (log: {done.log})", done.seconds, figures)]
    if not counts.get("passed"):
        return [Row("pytest", FAIL, f"every gpu test was skipped: {summary}", done.seconds, figures)]
    return [Row("pytest", PASS, summary, done.seconds, figures)]


CHECK = Check("pytest", "pytest -m gpu tests/gpu: every gpu-marked test", check_pytest, 240, ("pytest",))
