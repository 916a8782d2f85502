"""Fault injection for drills and tests: make one site fail on purpose.

SCALING_FL_FAIL_AT="site=2,round=3[,attempts=1][,mode=hang]" raises in site 2 when round 3
starts, on the first `attempts` starts of the job (torch elastic counts restarts), so both a
recovered failure and exhausted restarts can be rehearsed. mode=hang makes the site stop
answering instead (alive, connections open), as a frozen or partitioned peer would: the
others must notice through the collective timeout.
"""

from __future__ import annotations

import os
import time


class InjectedFault(RuntimeError):
    pass


def maybe_fail(site: int, round_number: int) -> None:
    spec = os.environ.get("SCALING_FL_FAIL_AT")
    if not spec:
        return
    fields = dict(part.split("=", 1) for part in spec.split(",") if "=" in part)
    attempts = int(fields.get("attempts", 10**9))
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if int(fields.get("site", -1)) == site and int(fields.get("round", -1)) == round_number and restart < attempts:
        if fields.get("mode") == "hang":
            while True:
                time.sleep(3600)
        raise InjectedFault(f"injected failure in site {site} at round {round_number} (SCALING_FL_FAIL_AT={spec})")
