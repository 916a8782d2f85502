"""Checkpoints: exact resume, SIGKILL recovery, broken checkpoints skipped, retention, safety."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from scaling_fl import checkpoint
from tests.cli import TINY_JOB, cli_command, raw_config, read_record, run_cli, run_records

SMALL = [*TINY_JOB, "synthetic_train_size=240", "synthetic_test_size=60", "site_ids=[0,0]"]
COMPARABLE = (
    "validation.loss",
    "validation.accuracy",
    "validation.f1_macro",
    "train.loss",
    "train.accuracy",
    "comm.bytes_per_site",
)
# Top-k with error feedback, a server optimizer, and rounds that end between synchronizations
# (sync after every 3 local steps, 4 steps a round): residuals, moments and local models must all come back.
# 1 %, not 10 %: tiny-bert's update is non-zero on only ~104k weights besides the embedding rows of the
# synthetic task's few tokens (2.06M in all), so top-10 % sends all of it and every residual stays zero.
STATEFUL = [
    "exchange=sparse",
    "sparsity_level=0.01",
    "strategy=fedadam",
    "sync=periodic",
    "comm_period=3",
    "local_steps=4",
]


def _final(runs: Path) -> dict:
    return read_record(run_records(runs)[-1])


def _rounds(ck: Path) -> list[str]:
    return sorted(p.name for p in ck.iterdir() if not p.name.startswith("."))  # (.claims: the job's claim)


@pytest.mark.parametrize("exchange", [[], STATEFUL], ids=["dense-fedavg", "sparse-fedadam-periodic"])
@pytest.mark.slow
def test_stopped_and_resumed_run_equals_an_uninterrupted_one_bitwise(tmp_path, exchange):
    common = [*SMALL, *exchange, "num_rounds=3", "learning_rate=0.003"]
    every = [f"checkpoints_dir={tmp_path / 'ck-every'}", "checkpoint_every=2", "keep_last_checkpoints=10"]
    straight = run_cli(tmp_path, "with", *common, *every, "job_name=straight", f"runs_dir={tmp_path / 'a'}")
    assert straight.returncode == 0, straight.stderr[-2000:]
    # checkpoint_every=2: every 2nd round, and the last
    assert _rounds(tmp_path / "ck-every") == ["round-000002", "round-000003"]
    stopped = run_cli(
        tmp_path,
        "with",
        *common,
        "job_name=stopped",
        f"runs_dir={tmp_path / 'b'}",
        f"checkpoints_dir={tmp_path / 'ck'}",
        "max_restarts=0",
        env={"SCALING_FL_FAIL_AT": "site=0,round=3"},
    )  # dies after round 2 is checkpointed
    assert stopped.returncode != 0
    assert _rounds(tmp_path / "ck") == ["round-000001", "round-000002"]
    saved = checkpoint.verify(str(tmp_path / "ck" / "round-000002"))
    extra = sorted(
        name
        for name in os.listdir(saved.directory)
        if name not in ("global.safetensors", "state.json", checkpoint.MARKER)
    )
    if exchange:  # each site's residual and (round 2 ended unsynchronized) local model; the server moments
        assert extra == ["site-00000.safetensors", "site-00001.safetensors", "strategy.safetensors"]
        for site in (0, 1):
            own = saved.tensors(checkpoint.site_file(site))
            assert sorted(own) == ["local", "residual"]
            assert own["residual"].count_nonzero() > 0  # what top-k did not send yet: it must come back
        assert sorted(saved.tensors("strategy.safetensors")) == ["m", "step", "v"]
    else:  # dense FedAvg synchronized every round has no state beyond the global model
        assert extra == []
    resumed = run_cli(
        tmp_path,
        "with",
        *common,
        "job_name=stopped",
        f"runs_dir={tmp_path / 'b'}",
        f"checkpoints_dir={tmp_path / 'ck'}",
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {tmp_path / 'ck' / 'round-000002'}: continuing at round 3" in resumed.stderr
    assert len(run_records(tmp_path / "b")) == 1  # the resumed run continued the stopped run's Sacred record
    _assert_same_rounds(_final(tmp_path / "a"), _final(tmp_path / "b"))
    if exchange:
        return
    # An explicit round folder of the straight run (not its newest), taken by another job, continues from there.
    folder = tmp_path / "ck-every" / "round-000002"
    fork = run_cli(tmp_path, "with", *common, "job_name=fork", f"resume_from={folder}", f"runs_dir={tmp_path / 'c'}")
    assert fork.returncode == 0, fork.stderr[-2000:]
    assert f"resumed from {folder}: continuing at round 3" in fork.stderr
    _assert_same_rounds(_final(tmp_path / "a"), _final(tmp_path / "c"))


def _assert_same_rounds(uninterrupted: dict, continued: dict) -> None:
    assert continued["info"]["final_weights_sha256"] == uninterrupted["info"]["final_weights_sha256"]
    for name in COMPARABLE:
        assert continued["metrics"][name]["steps"] == [1, 2, 3], name
        assert continued["metrics"][name]["values"] == uninterrupted["metrics"][name]["values"], name


def _children(pid: int) -> list[tuple[int, str]]:
    found = []
    for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split():
        try:
            found.append((int(child), Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace")))
        except OSError:
            continue
    return found


def _site_pids(launcher_pid: int) -> list[int]:
    """The launcher's site processes: its spawn_main children (start_method=spawn) or its fork
    server's children (forkserver); not multiprocessing's resource tracker, not tee."""
    pids = []
    for pid, cmdline in _children(launcher_pid):
        if "resource_tracker" in cmdline:
            continue
        if "spawn_main" in cmdline:
            pids.append(pid)
        elif "forkserver" in cmdline:
            pids.extend(child for child, line in _children(pid) if "resource_tracker" not in line)
    return pids


@pytest.mark.slow
def test_a_site_killed_mid_round_is_restarted_and_the_run_finishes_logging_each_round_once(tmp_path):
    runs, ck = tmp_path / "runs", tmp_path / "ck"
    process = subprocess.Popen(
        cli_command(
            "with",
            *TINY_JOB,
            "site_ids=[0,0]",
            "synthetic_train_size=1000",
            "synthetic_test_size=60",
            "num_rounds=4",
            "max_restarts=3",
            "job_name=killed",
            f"runs_dir={runs}",
            f"checkpoints_dir={ck}",
        ),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 240
        while not (ck / "round-000002" / checkpoint.MARKER).exists():
            assert process.poll() is None and time.time() < deadline, "round 2 never got checkpointed"
            time.sleep(0.2)
        victims = _site_pids(process.pid)
        assert len(victims) == 2
        os.kill(victims[1], signal.SIGKILL)
        output, _ = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 0, output[-3000:]
    record = read_record(run_records(runs)[0])
    assert len(run_records(runs)) == 1
    assert record["run"]["status"] == "COMPLETED"
    assert record["info"]["restarts"] == 1
    for name in COMPARABLE:
        assert record["metrics"][name]["steps"] == [1, 2, 3, 4], name
    restarted = re.search(r"sites restarted \(restart 1 of at most 3\), continuing after round (\d+)", output)
    resumed = re.search(r"resumed from \S+/round-(\d{6}): continuing at round (\d+)", output)
    assert restarted and resumed, output[-3000:]
    # the restarted sites took the checkpoint (round 2 or later), they did not start over
    assert int(resumed.group(1)) >= 2
    assert int(restarted.group(1)) == int(resumed.group(1)) == int(resumed.group(2)) - 1


@pytest.mark.slow
def test_a_hung_site_is_detected_within_the_collective_timeout_and_the_run_recovers(tmp_path):
    """A peer that stops answering (alive, connections open) must not block the others for torch's
    30-minute default: after collective_timeout_s they fail, elastic restarts every site from the
    last checkpoint, and the run finishes."""
    runs, ck = tmp_path / "runs", tmp_path / "ck"
    started = time.monotonic()
    result = run_cli(
        tmp_path,
        "with",
        *SMALL,
        "num_rounds=3",
        "collective_timeout_s=10",
        "max_restarts=1",
        "job_name=hung",
        f"runs_dir={runs}",
        f"checkpoints_dir={ck}",
        env={"SCALING_FL_FAIL_AT": "site=1,round=2,attempts=1,mode=hang"},
        timeout=300,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sites restarted (restart 1 of at most 1), continuing after round 1" in result.stderr
    assert elapsed < 120, elapsed  # one 10 s timeout, a restart, three tiny rounds: far from 30 minutes
    record = read_record(run_records(runs)[0])
    assert record["run"]["status"] == "COMPLETED" and record["info"]["restarts"] == 1
    assert record["metrics"]["validation.accuracy"]["steps"] == [1, 2, 3]


@pytest.mark.slow
def test_broken_checkpoints_are_skipped_and_retention_counts_only_good_ones(tmp_path):
    ck, runs = tmp_path / "ck", tmp_path / "runs"
    job = [*SMALL, "job_name=broken", f"checkpoints_dir={ck}", f"runs_dir={runs}"]
    first = run_cli(tmp_path, "with", *job, "num_rounds=4", "keep_last_checkpoints=3")
    assert first.returncode == 0, first.stderr[-2000:]
    assert _rounds(ck) == ["round-000002", "round-000003", "round-000004"]
    newest = ck / "round-000004" / "global.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated, still marked
    (ck / "round-000003" / checkpoint.MARKER).unlink()  # as if killed before the marker was written
    # Checkpoint rounds 3 and 6 only: the truncated round 4 is not rewritten, so retention meets it.
    again = run_cli(tmp_path, "with", *job, "num_rounds=6", "keep_last_checkpoints=2", "checkpoint_every=3")
    assert again.returncode == 0, again.stderr[-2000:]
    assert (
        f"skipping checkpoint {ck}/round-000004: {ck}/round-000004/global.safetensors does not match its marker"
        in again.stderr
    )
    assert f"skipping checkpoint {ck}/round-000003: {ck}/round-000003 has no COMMITTED marker" in again.stderr
    assert f"resumed from {ck}/round-000002: continuing at round 3" in again.stderr
    assert len(run_records(runs)) == 1
    record = read_record(run_records(runs)[0])
    assert record["metrics"]["validation.accuracy"]["steps"] == [1, 2, 3, 4, 5, 6]
    # Kept: the 2 newest good ones (3, 6); the broken round 4 is older than the newest good one: removed.
    assert _rounds(ck) == ["round-000003", "round-000006"]
    assert f"removing broken checkpoint {ck}/round-000004" in again.stderr


def _good(ck: Path, number: int) -> None:
    directory = ck / f"round-{number:06d}"
    directory.mkdir(parents=True)
    checkpoint.write_tensors(str(directory), "global.safetensors", {"global": torch.full((4,), float(number))})
    checkpoint.write_state(str(directory), {"round": number})
    checkpoint.commit(str(directory))


def test_retention_keeps_the_newest_good_checkpoints_and_drops_older_broken_ones(tmp_path):
    ck = tmp_path / "ck"
    for number in range(1, 8):
        _good(ck, number)
    for number in (3, 6):  # marked but truncated
        path = ck / f"round-{number:06d}" / "global.safetensors"
        path.write_bytes(path.read_bytes()[:-4])
    for number in (4, 7):  # partial: no marker
        (ck / f"round-{number:06d}" / checkpoint.MARKER).unlink()
    removed = checkpoint.prune(str(ck), keep_last=2)
    # good: 1 2 5; keep the newest two (2, 5); 1 (too old), 3 (broken) and 4 (partial) are older than 5;
    # 6 and 7 are newer than every good checkpoint and stay (they may be a write in flight).
    assert _rounds(ck) == ["round-000002", "round-000005", "round-000006", "round-000007"]
    assert sorted(Path(path).name for path in removed) == ["round-000001", "round-000003", "round-000004"]
    assert checkpoint.latest(str(ck)).round == 5
    assert checkpoint.prune(str(ck), keep_last=1) == [str(ck / "round-000002")]  # never the newest good one
    assert _rounds(ck) == ["round-000005", "round-000006", "round-000007"]


def _preflight(args: list[str]):
    """The launcher's checks before any worker (job.preflight), in-process, on `key=value` arguments."""
    from scaling_fl import job
    from scaling_fl.config import resolve

    return job.preflight(resolve(raw_config(args)))


@pytest.mark.slow
def test_a_changed_experiment_or_another_job_is_refused_unless_forced(tmp_path):
    from scaling_fl.errors import UserError

    ck, runs = tmp_path / "ck", tmp_path / "runs"
    base = [*SMALL, f"checkpoints_dir={ck}", f"runs_dir={runs}"]
    assert run_cli(tmp_path, "with", *base, "num_rounds=1", "job_name=changed").returncode == 0
    # The refusals come from the launcher's pre-flight (the command line prints its one line, exit 2:
    # tests/test_config.py); checked in-process here.
    with pytest.raises(UserError) as refused:
        _preflight([*base, "num_rounds=2", "job_name=changed", "split=label_sorted"])
    assert "different experiment (split: 'iid' -> 'label_sorted')" in str(refused.value)
    assert "resume=force" in str(refused.value)
    with pytest.raises(UserError) as stranger:
        _preflight([*base, "num_rounds=2", "job_name=stranger"])
    assert str(stranger.value) == (
        f"checkpoint {ck}/round-000001 belongs to job_name='changed', not 'stranger': run with "
        "job_name=changed to continue it, another checkpoints_dir for a new job, or resume=force to continue it anyway"
    )
    assert _rounds(ck) == ["round-000001"] and len(run_records(runs)) == 1  # refused before anything was written
    forced = run_cli(tmp_path, "with", *base, "num_rounds=2", "job_name=stranger", "split=label_sorted", "resume=force")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert f"resume=force: job 'stranger' continues {ck}/round-000001 of job 'changed'" in forced.stderr
    assert "resume=force: continuing" in forced.stderr and "continuing at round 2" in forced.stderr


class _Bomb:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['BOMB_SENTINEL']}",))


def test_a_malicious_checkpoint_cannot_execute_code(tmp_path, monkeypatch):
    sentinel = tmp_path / "pwned"
    monkeypatch.setenv("BOMB_SENTINEL", str(sentinel))
    good = tmp_path / "ck" / "round-000001"
    good.mkdir(parents=True)
    checkpoint.write_tensors(str(good), "global.safetensors", {"global": torch.ones(3)})
    checkpoint.write_state(str(good), {"round": 1})
    checkpoint.commit(str(good))
    evil = tmp_path / "ck" / "round-000002"
    evil.mkdir()
    (evil / "global.safetensors").write_bytes(pickle.dumps(_Bomb()))  # a pickle posing as a checkpoint
    checkpoint.write_state(str(evil), {"round": 2})
    checkpoint.commit(str(evil))  # even a marker that matches the evil bytes does not help
    found = checkpoint.latest(str(tmp_path / "ck"))
    assert found.round == 1
    assert found.tensors("global.safetensors")["global"].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(checkpoint.CheckpointError, match="not a safetensors file"):
        checkpoint.verify(str(evil))
    assert not sentinel.exists()


def _rewrite_state(state) -> Callable:
    def apply(directory: Path) -> None:
        data = state if isinstance(state, bytes) else json.dumps(state).encode()
        (directory / "state.json").write_bytes(data)
        checkpoint.commit(str(directory))  # re-sealed: every hash matches, only the content is wrong

    return apply


def _rewrite_marker(change) -> Callable:
    """Replaces COMMITTED by change(marker as written by commit, directory): the seal itself is the bad part."""

    def apply(directory: Path) -> None:
        marker = json.loads((directory / checkpoint.MARKER).read_bytes())
        changed = change(marker, directory)
        data = changed if isinstance(changed, bytes) else json.dumps(changed).encode()
        (directory / checkpoint.MARKER).write_bytes(data)

    return apply


def _entry(path: Path) -> dict:
    data = path.read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _with_file(name: str, target: str):
    """A marker that also lists `name`, with the true size and hash of `target` (relative to the folder)."""

    def change(marker, directory):
        return {**marker, "files": {**marker["files"], name: _entry(directory / target)}}

    return change


def _with_entry(name: str, entry) -> Callable:
    return lambda marker, directory: {**marker, "files": {**marker["files"], name: entry}}


def _rewrite_global(data: bytes) -> Callable:
    def apply(directory: Path) -> None:
        (directory / "global.safetensors").write_bytes(data)
        checkpoint.commit(str(directory))

    return apply


def _safetensors(header) -> bytes:
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded + bytes(16)


MALFORMED = {
    "state-not-utf8": _rewrite_state(b"\xff\xfe{}"),
    "state-is-a-list": _rewrite_state([{"round": 2}]),
    "state-without-round": _rewrite_state({"history": []}),
    "round-is-a-string": _rewrite_state({"round": "x"}),
    "round-is-a-float": _rewrite_state({"round": 2.0}),
    "round-is-zero": _rewrite_state({"round": 0}),
    "round-is-negative": _rewrite_state({"round": -2}),
    "round-is-a-bool": _rewrite_state({"round": True}),
    "round-is-not-the-folders": _rewrite_state({"round": 3}),
    "history-is-a-dict": _rewrite_state({"round": 2, "history": {"round": 1, "metrics": {}}}),
    "history-entry-is-a-number": _rewrite_state({"round": 2, "history": [1]}),
    "history-entry-without-metrics": _rewrite_state({"round": 2, "history": [{"round": 1}]}),
    "defining-config-is-a-list": _rewrite_state({"round": 2, "defining_config": ["model"]}),
    "job-name-is-a-list": _rewrite_state({"round": 2, "job_name": ["a"]}),
    "marker-not-utf8": _rewrite_marker(lambda marker, directory: b"\xff\xfe{}"),
    "marker-is-a-list": _rewrite_marker(lambda marker, directory: [marker]),
    "marker-without-files": _rewrite_marker(lambda marker, directory: {"format": 1}),
    "marker-format-is-a-string": _rewrite_marker(lambda marker, directory: {**marker, "format": "1"}),
    "files-is-a-list": _rewrite_marker(lambda marker, directory: {**marker, "files": sorted(marker["files"])}),
    "entry-is-a-list": _rewrite_marker(_with_entry("state.json", [1, "ab"])),
    "entry-without-size": _rewrite_marker(
        lambda marker, directory: {
            **marker,
            "files": {**marker["files"], "state.json": {"sha256": marker["files"]["state.json"]["sha256"]}},
        }
    ),
    "entry-without-sha256": _rewrite_marker(
        lambda marker, directory: {
            **marker,
            "files": {**marker["files"], "state.json": {"size": marker["files"]["state.json"]["size"]}},
        }
    ),
    "size-is-a-string": _rewrite_marker(
        lambda marker, directory: {
            **marker,
            "files": {
                **marker["files"],
                "state.json": {**marker["files"]["state.json"], "size": str(marker["files"]["state.json"]["size"])},
            },
        }
    ),
    "sha256-is-a-number": _rewrite_marker(
        lambda marker, directory: {
            **marker,
            "files": {**marker["files"], "state.json": {**marker["files"]["state.json"], "sha256": 7}},
        }
    ),
    "name-leaves-the-folder": _rewrite_marker(_with_file("../round-000001/state.json", "../round-000001/state.json")),
    "name-with-a-separator": _rewrite_marker(_with_file("sub/state.json", "state.json")),
    "name-with-a-backslash": _rewrite_marker(_with_file("sub\\state.json", "state.json")),
    "safetensors-header-is-a-list": _rewrite_global(_safetensors([1, 2])),
    "safetensors-offsets-are-strings": _rewrite_global(
        _safetensors({"global": {"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}})
    ),
    "safetensors-offsets-are-short": _rewrite_global(
        _safetensors({"global": {"dtype": "F32", "shape": [4], "data_offsets": [0]}})
    ),
}


@pytest.mark.parametrize("malform", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_sealed_checkpoint_with_malformed_content_is_skipped_like_any_broken_one(tmp_path, caplog, malform):
    """The marker's hashes match, but what it seals (or the marker itself) has the wrong shape:
    verify() says CheckpointError naming the folder, never KeyError/TypeError/..., and latest()
    takes the previous good round with exactly one warning."""
    ck = tmp_path / "ck"
    _good(ck, 1)
    _good(ck, 2)
    broken = ck / "round-000002"
    malform(broken)
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(str(broken))):
        checkpoint.verify(str(broken))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scaling_fl"):
        found = checkpoint.latest(str(ck))
    assert found is not None and found.round == 1 and found.directory == str(ck / "round-000001")
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1 and f"skipping checkpoint {broken}: " in warnings[0], warnings
    _good(ck, 3)  # now older than a good round, the broken one goes, with one warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scaling_fl"):
        removed = checkpoint.prune(str(ck), keep_last=2)
    assert removed == [str(broken)] and _rounds(ck) == ["round-000001", "round-000003"]
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1 and f"removing broken checkpoint {broken}: " in warnings[0], warnings
