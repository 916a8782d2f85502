"""Fault injection: sites that fail on purpose (drills, tests) and sites that lie (byzantine_sites).

SCALING_FL_FAIL_AT="site=2,round=3[,attempts=1][,mode=hang]" raises in site 2 when round 3
starts, on the first `attempts` starts of the job (torch elastic counts restarts), so both a
recovered failure and exhausted restarts can be rehearsed. mode=hang makes the site stop
answering instead (alive, connections open), as a frozen or partitioned peer would: the
others must notice through the collective timeout. mode=kill sends SIGKILL to the site's whole
process group (its launcher, fork server and worker: a machine that dies; start the site in a
session of its own, as a terminal or a container does).
"""

from __future__ import annotations

import os
import signal
import time

import torch

BYZANTINE_MODES = ("sign_flip", "scale")


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
        if fields.get("mode") == "kill":
            os.killpg(os.getpgid(0), signal.SIGKILL)
        raise InjectedFault(f"injected failure in site {site} at round {round_number} (SCALING_FL_FAIL_AT={spec})")


@torch.no_grad()
def corrupt_update_(local: torch.Tensor, global_: torch.Tensor, mode: str, scale: float) -> None:
    """A byzantine site's message (byzantine_sites): its update local - global_ replaced, in local, by
    -update (sign_flip) or scale x update (scale), so a researcher can show what a robust
    aggregation rule withstands and what the mean does not."""
    if mode not in BYZANTINE_MODES:
        raise ValueError(f"byzantine_mode must be one of {', '.join(BYZANTINE_MODES)}, got {mode!r}")
    factor = -1.0 if mode == "sign_flip" else scale
    local.sub_(global_).mul_(factor).add_(global_)
