"""Fault injection at larger counts: the attacks of tests/test_faults.py on real `headroom serve`
processes (uvicorn, a real SQLite file, a scripted fake upstream), counted.

    python bench/faults.py [--kill-requests 600] [--users 6] [--steps 15] [--disk-facts 120]
                           [--poison-others 50] [--repeat 10] [--no-write]

Prints `case | tried | survived | lost` and writes it, with the machine and the date, into the
"Faults" section of bench/RESULTS.md (unless --no-write). Must run as root for the full-disk case
(it mounts a small tmpfs and unmounts it again).

What the columns count. Write-path cases: `tried` = memory ops whose answer the client received
whole; `survived` = stored exactly once; `lost` = never stored. Upstream and input cases: `tried`
= attacks; `survived` = answered as specified (the status, the error shape, the bound in time,
no block leaked); `lost` = attacks answered any other way.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import test_faults as faults  # noqa: E402
from tests.servers import FakeUpstream, running_upstream  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "## Faults"
# The kill attack on a server that answers before the op is durable (as before issue 9): it must
# lose ops, or the attack could not tell.
CONTROL = "control: SIGKILL, answers before durable (durable_wait_s=0)"


def repeated(case: str, attack: Callable[[], None], times: int) -> faults.Tally:
    """`attack` run `times` times; an AssertionError (or any error) is one not survived."""
    tally = faults.Tally(case, tried=times)
    failures: list[str] = []
    for _ in range(times):
        try:
            attack()
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {exc}"[:200])
        else:
            tally.survived += 1
    tally.lost = len(failures)
    tally.notes["first failures"] = failures[:2]
    return tally


def run(args: argparse.Namespace) -> list[faults.Tally]:
    script = faults.Script()
    work = Path(tempfile.mkdtemp(prefix="headroom-faults-"))
    tallies: list[faults.Tally] = []
    with running_upstream(FakeUpstream(responder=script)) as (url, fake):
        t0 = time.monotonic()
        tallies.append(faults.attack_random_kills(work / "kill.db", url, args.kill_requests,
                                                  deadline_s=600))
        control = faults.attack_random_kills(work / "control.db", url, args.kill_requests // 2,
                                             deadline_s=600, durable_wait_s=0.0)
        control.case = CONTROL
        tallies.append(control)
        tallies.append(faults.attack_two_processes(work / "two.db", url, script, args.users,
                                                   args.steps))
        tallies.append(faults.attack_full_disk(work / "mnt", url, args.disk_facts))
        shared = faults.ServerProcess(
            work / "shared.db", url, upstream_read_timeout_s=faults.READ_TIMEOUT_S,
            body_read_timeout_s=faults.BODY_TIMEOUT_S,
            header_read_timeout_s=faults.BODY_TIMEOUT_S,
        )
        with faults.started(shared):
            tallies.append(faults.attack_poison(shared, args.poison_others))
            n = args.repeat
            cases: list[tuple[str, Callable[[], None]]] = [
                ("upstream hangs (read timeout)",
                 lambda: faults.test_an_upstream_that_hangs_gets_an_openai_error_within_the_read_timeout(shared)),  # noqa: E501
                ("upstream drops mid-stream",
                 lambda: faults.test_an_upstream_dropped_mid_stream_breaks_the_stream_and_leaks_no_block(shared)),  # noqa: E501
                ("client leaves mid-stream",
                 lambda: faults.test_a_client_that_leaves_mid_stream_releases_the_upstream(
                     shared, (url, fake))),
                ('"stream": "true"', lambda: faults.test_a_string_stream_flag_is_a_400(shared)),
                ("body nested 100,000 deep",
                 lambda: faults.test_a_body_nested_100000_deep_is_a_400(shared)),
                ("stalled client body", lambda: faults.test_a_stalled_client_body_is_a_408(shared)),
                ("stalled request headers",
                 lambda: faults.test_stalled_request_headers_are_a_408(shared)),
            ]
            for case, attack in cases:
                tallies.append(repeated(case, attack, n))
        print(f"all attacks: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return tallies


def verdict_ok(tally: faults.Tally) -> bool:
    if tally.case == CONTROL:  # the attack must catch an answer given before its op is durable
        return tally.lost > 0
    bad_counts = ("stored twice", "double applies", "resurrections", "failures", "errors")
    if tally.lost or any(tally.notes.get(k) for k in bad_counts):
        return False
    return all(v is not False for v in tally.notes.values())


def table(tallies: list[faults.Tally]) -> str:
    lines = ["| case | tried | survived | lost | other findings |", "|---|---:|---:|---:|---|"]
    for t in tallies:
        notes = "; ".join(f"{k}: {_short(v)}" for k, v in t.notes.items()
                          if k not in ("first errors", "first failures", "reasons") or v)
        lines.append(f"| {t.case} | {t.tried} | {t.survived} | {t.lost} | {notes} |")
    return "\n".join(lines)


def _short(value: Any) -> str:
    return re.sub(r"database \S+: ", "database: ", str(value)).replace("|", "/")[:200]


def machine() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = re.search(r"Model name:\s*(.+)", out)
    cpus = re.search(r"^CPU\(s\):\s*(\d+)", out, re.M)
    name = model.group(1).strip() if model else "unknown CPU"
    return f"{name}, {cpus.group(1) if cpus else '?'} CPUs"


def section(tallies: list[faults.Tally], args: argparse.Namespace) -> str:
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True, check=False).stdout.strip()
    passed = all(verdict_ok(t) for t in tallies)
    return "\n".join([
        SECTION, "",
        f"`python bench/faults.py` ({when}, commit {commit}, {machine()}, shared with other "
        "jobs). Real server processes (proxy.server.serve, what `headroom serve` runs) on real "
        "SQLite files in front of a scripted fake upstream; only the model is swapped, for a "
        "deterministic fake that refuses invalid UTF-8 like the real tokenizer. Arguments: "
        f"`--kill-requests {args.kill_requests} --users {args.users} --steps {args.steps} "
        f"--disk-facts {args.disk_facts} --poison-others {args.poison_others} "
        f"--repeat {args.repeat}`.", "",
        "Write-path rows: tried = ops whose answer the client received whole, survived = stored "
        "exactly once, lost = never stored. The attacks: SIGKILL at a random moment (0.2-3.0 s) "
        "into a load of 6 clients (stream and not), every other kill while another connection "
        "holds the write lock, restart, repeat; two processes on one file, "
        "each user adding a fact through one and forgetting or updating it through the other "
        "(double applies = events a request made twice on one memory, plus reinforcements; "
        "resurrections = a forgotten or superseded memory current again); the database on a "
        "24 MiB tmpfs filled by a filler file, each answer for a new user, then the filler "
        "deleted; a block with a lone surrogate escape and one the model refuses, then other "
        "users' writes. The control row runs the kill attack (half the requests) on a server "
        "told not to wait for the outbox commit (durable_wait_s=0, the pre-issue-9 order): it "
        "must lose ops, which shows the attack can tell. Upstream and input rows: tried = "
        "attacks, survived = answered as specified (status, OpenAI error shape, time bound, "
        "no block leaked).", "",
        table(tallies), "",
        "Verdict: " + ("every attack survived, 0 lost; the control lost ops." if passed
                       else "FAILURES, see the rows."),
        "",
    ])


def write_section(text: str) -> None:
    """Replace the Faults section of RESULTS.md (up to the next `## `), or append it."""
    current = RESULTS.read_text()
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(current):
        updated = pattern.sub(lambda _: text + "\n", current, count=1)
    else:
        updated = current.rstrip("\n") + "\n\n" + text
    RESULTS.write_text(updated)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-requests", type=int, default=600)
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--disk-facts", type=int, default=120)
    parser.add_argument("--poison-others", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    tallies = run(args)
    text = section(tallies, args)
    print(text)
    if not args.no_write:
        write_section(text)
    return 0 if all(verdict_ok(t) for t in tallies) else 1


if __name__ == "__main__":
    sys.exit(main())
