"""Cross-silo runs (scaling_fl/cross_silo.py): the roles' config rules in-process, and one run through the
real command line: a coordinator and three sites started apart, in a scrambled order, over TLS on
loopback, against the one-machine rehearsal of the same three files (split=none, which this test
also covers through the command line)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from scaling_fl import cross_silo
from scaling_fl.config import ConfigError, resolve
from tests.cli import ROOT, cli_command, read_record, run_cli, run_records
from tests.test_site_files import _silos

TOKEN = "cross-silo-test-token-0123456789abcdef"
CSV = ["task_name=csv", "text_columns=['text']", "label_column=topic"]
TRAINING = ["model=tiny-bert", "max_seq_len=32", "learning_rate=0.003", "batch_size=4", "validation_fraction=0.2"]
COORDINATOR = {"role": "coordinator", "num_sites": 3, "insecure": True, "task_name": "csv", "test_path": "t.csv"}
COORDINATOR |= {"text_columns": ["text"], "label_column": "topic"}
SITE = {"role": "site", "coordinator_address": "localhost:29400", "site_name": "a", "train_path": "a.csv"}


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({**COORDINATOR, "num_sites": None}, "num_sites=None is not allowed: the number of sites to admit"),
        ({**COORDINATOR, "insecure": False}, "tls_certfile=None is not allowed: a certificate with tls_keyfile"),
        ({**COORDINATOR, "train_path": "x.csv"}, "train_path='x.csv' is not allowed: unset on the coordinator"),
        ({**COORDINATOR, "test_path": None}, "test_path=None is not allowed: the test set with role=coordinator"),
        ({**COORDINATOR, "min_sites": 4}, "min_sites=4 is not allowed: at most the 3 sites"),
        ({**COORDINATOR, "site_names": ["a", "b"]}, "num_sites=3 is not allowed: 2, the length of site_names"),
        ({**COORDINATOR, "fraction_fit": 0.5}, "fraction_fit=0.5 is not allowed: 1 (every joined site trains"),
        ({**COORDINATOR, "exchange": "sparse"}, "error_feedback=True is not allowed: False with a compressed"),
        ({**COORDINATOR, "strategy": "scaffold"}, "strategy='scaffold' is not allowed"),
        ({**COORDINATOR, "split": "iid"}, "split='iid' is not allowed: none (or unset) with role=coordinator"),
        (SITE, "tls_cafile=None is not allowed: the CA certificate of the coordinator with role=site"),
        ({**SITE, "insecure": True, "site_name": None}, "site_name=None is not allowed: this site's name"),
        (
            {**SITE, "insecure": True, "train_path": ["a.csv", "b.csv"]},
            "train_path=('a.csv', 'b.csv') is not allowed: this site's one training file",
        ),
        ({"site_name": "a"}, "site_name='a' is not allowed: unset without role=coordinator or role=site"),
        ({**SITE, "coordinator_address": "nohost"}, "coordinator_address='nohost' is not allowed: HOST:PORT"),
    ],
)
def test_each_role_gets_the_keys_it_needs_and_the_unsupported_ones_are_refused(given, message):
    with pytest.raises(ConfigError) as error:
        resolve(given)
    assert str(error.value).startswith(message)


def test_a_site_trains_the_coordinators_keys_with_its_own_file_device_and_name():
    coordinator = resolve({**COORDINATOR, "learning_rate": 0.01, "tracking": "file", "runs_dir": "/secret/runs"})
    sent = cross_silo.run_config(coordinator)
    assert sent["learning_rate"] == 0.01 and sent["task_name"] == "csv"
    for kept_home in ("runs_dir", "test_path", "listen_address", "tls_keyfile", "num_sites", "role", "tracking"):
        assert kept_home not in sent
    site = resolve({**SITE, "insecure": True, "site_ids": [1], "learning_rate": 0.01, "seed": 7})
    trained = cross_silo.site_config(sent, site)
    assert trained.role == "site" and trained.train_path == "a.csv" and trained.site_ids == (1,)
    assert trained.learning_rate == 0.01 and trained.seed == 42 and trained.split == "none"  # the run's, not its own
    own = cross_silo.own_training_keys(site, ["role", "site_name", "learning_rate", "seed", "site_ids"])
    assert own == {"learning_rate": 0.01, "seed": 7}  # what the door compares with the run's


def _free_port_pair() -> int:
    """A port P with P + 1 free too (the door and the collective store)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        try:
            with socket.socket() as second:
                second.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free pair of ports")


def _wait_for_line(log: Path, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"{log.name} never said {text!r}:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def _start(tmp_path: Path, name: str, *args: str, env: dict) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"{name}.log"
    handle = log.open("w")
    process = subprocess.Popen(
        cli_command("with", *args),
        cwd=tmp_path,
        stdout=handle,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, as on a machine of its own
    )
    return process, log


@pytest.mark.slow
def test_a_coordinator_and_three_sites_started_apart_train_as_the_rehearsal_does(tmp_path):
    files, test = _silos(tmp_path)
    common = [*TRAINING, "num_rounds=2", "per_site_metrics=True"]
    rehearsal = run_cli(
        tmp_path,
        "with",
        *CSV,
        *common,
        f"train_path=[{','.join(repr(f) for f in files)}]",
        f"test_path={test}",
        "split=none",
        "site_ids=[0,0,0]",
        "job_name=rehearsal",
        f"runs_dir={tmp_path / 'rehearsal'}",
    )
    assert rehearsal.returncode == 0, rehearsal.stderr[-3000:]
    simulated = read_record(run_records(tmp_path / "rehearsal")[0])
    assert simulated["info"]["sites"]["sizes"] == [13, 8, 9]  # 16, 10, 10 rows, 20 % of each label held out
    assert simulated["info"]["sites"]["label_histograms"] == [[0, 3, 10], [0, 8, 0], [5, 2, 2]]
    assert simulated["config"]["split"] == "none" and simulated["config"]["train_path"] == files
    assert "site 1: 8 rows  business:0 science:8 sports:0" in rehearsal.stderr

    certs = tmp_path / "certs"
    subprocess.run(["bash", str(ROOT / "scripts" / "make_test_certs.sh"), str(certs)], check=True, capture_output=True)
    port = _free_port_pair()
    env = {**os.environ, "FL_JOIN_TOKEN": TOKEN}
    site = ["role=site", f"coordinator_address=localhost:{port}", f"tls_cafile={certs / 'ca.crt'}"]
    names = ["hospital-a", "hospital-b", "hospital-c"]
    # site c knocks before the coordinator listens, a last; an impostor with the wrong token in between
    started = [_start(tmp_path, "hospital-c", *site, "site_name=hospital-c", f"train_path={files[2]}", env=env)]
    time.sleep(2)
    started.append(
        _start(
            tmp_path,
            "coordinator",
            "role=coordinator",
            f"site_names={names}",
            f"listen_address=127.0.0.1:{port}",
            f"tls_certfile={certs / 'coordinator.crt'}",
            f"tls_keyfile={certs / 'coordinator.key'}",
            *CSV,
            *common,
            f"test_path={test}",
            "job_name=silos",
            f"runs_dir={tmp_path / 'silos'}",
            env=env,
        )
    )
    wrong = {**env, "FL_JOIN_TOKEN": "not-the-token-of-this-run-000000"}
    _wait_for_line(started[1][1], "waiting for sites: 1/3 joined (hospital-c)")
    impostor = _start(tmp_path, "impostor", *site, "site_name=hospital-a", f"train_path={files[0]}", env=wrong)
    started.append(_start(tmp_path, "hospital-b", *site, "site_name=hospital-b", f"train_path={files[1]}", env=env))
    assert impostor[0].wait(timeout=120) != 0
    _wait_for_line(started[1][1], "waiting for sites: 2/3 joined (hospital-b)")
    started.append(_start(tmp_path, "hospital-a", *site, "site_name=hospital-a", f"train_path={files[0]}", env=env))
    for process, log in started:
        assert process.wait(timeout=300) == 0, f"{log.name}:\n{log.read_text()[-3000:]}"
    outputs = {log.stem: log.read_text() for _, log in [*started, impostor]}

    assert (
        "the coordinator refused this site: wrong join token (check FL_JOIN_TOKEN on this site)" in outputs["impostor"]
    )
    coordinator_log = outputs["coordinator"]
    assert "refused site 'hospital-a'" in coordinator_log and "wrong join token" in coordinator_log
    waiting = [line.split(" INFO ")[-1] for line in coordinator_log.splitlines() if "waiting for sites" in line]
    assert waiting == [
        "waiting for sites: 1/3 joined (hospital-c)",
        "waiting for sites: 2/3 joined (hospital-b)",
        "waiting for sites: 3/3 joined (hospital-a)",
    ]
    assert "FL starting: 3 sites joined (hospital-a, hospital-b, hospital-c)" in coordinator_log
    record = read_record(run_records(tmp_path / "silos")[0])
    joined = record["info"]["sites"]["joined"]
    assert {name: joined[name]["rows"] for name in names} == {"hospital-a": 16, "hospital-b": 10, "hospital-c": 10}
    assert joined["hospital-c"]["label_histogram"] == {"business": 6, "science": 2, "sports": 2}
    assert record["run"]["status"] == "COMPLETED"
    # The same sites on the same rows: the same model, up to the order of fp32 sums over 4 processes.
    for metric in ("validation.loss", "validation.accuracy", "test.loss", "train.loss"):
        assert record["metrics"][metric]["steps"] == simulated["metrics"][metric]["steps"], metric
        assert record["metrics"][metric]["values"] == pytest.approx(
            simulated["metrics"][metric]["values"], rel=1e-4, abs=1e-5
        ), metric
    # Each site's local metrics, under its name: its training as in the rehearsal; its local model
    # scored on its own validation rows (the rehearsal's site k scores the full validation set).
    for k, name in enumerate(names):
        for metric in ("train.loss", "train.accuracy"):
            assert record["metrics"][f"site.{name}.{metric}"]["values"] == pytest.approx(
                simulated["metrics"][f"site.{k}.{metric}"]["values"], rel=1e-4, abs=1e-5
            ), (name, metric)
        held_out = joined[name]["rows"] - simulated["info"]["sites"]["sizes"][k]  # 3, 2, 1 rows
        own = record["metrics"][f"site.{name}.validation.accuracy"]["values"]
        assert len(own) == 2 and all(value * held_out == pytest.approx(round(value * held_out)) for value in own)
        own_loss = record["metrics"][f"site.{name}.validation.loss"]["values"]
        assert own_loss[0] != pytest.approx(simulated["metrics"][f"site.{k}.validation.loss"]["values"][0])
    assert not any(metric.startswith("site.0.") for metric in record["metrics"])
    # The token is in no log, run record or config of any side.
    stored = json.dumps(record) + "".join(outputs.values())
    assert TOKEN not in stored and "not-the-token-of-this-run" not in stored


def _checkpoint_on_the_coordinator_only(root: str) -> dict:
    """Rank 0 plays the coordinator (its checkpoints_dir exists), rank 1 a site on another machine
    (the same key names a folder it does not have): save round 2, then restore into fresh state."""
    import types

    import torch
    import torch.distributed as dist

    from scaling_fl.train import federated
    from scaling_fl.train.components import privacy_from_config, strategy_from_config
    from tests.ranks import init_gloo

    rank, _ = init_gloo()
    folder = f"{root}/coordinator" if rank == 0 else f"{root}/on-the-coordinators-machine"
    cfg = resolve({"checkpoints_dir": folder, "strategy": "fedadam", "num_rounds": 3, "site_ids": [0, 0]})
    worker = types.SimpleNamespace(rank=rank, is_leader=rank == 0, device=torch.device("cpu"))
    trained = [("w", 6)]
    weights = torch.arange(6.0) + 10 * rank  # only rank 0's is saved
    strategy = strategy_from_config(cfg, weights)
    strategy.m.fill_(0.5 + rank), strategy.v.fill_(0.25 + rank)
    strategy.step = 2
    privacy = privacy_from_config(cfg, 2, participants=2)
    history = [{"round": 1, "metrics": {}}, {"round": 2, "metrics": {}}]
    federated._save_checkpoint(cfg, worker, 2, 2, weights, strategy, {}, history, privacy, trained)

    local, restored = torch.zeros(6), torch.zeros(6)
    fresh = strategy_from_config(cfg, restored)
    done, past, found = federated._restore(cfg, worker, local, restored, fresh, None, trained, leader_reads_only=True)
    dist.destroy_process_group()
    return {
        "done": done,
        "history": len(past),
        "found": found is not None,
        "weights": restored.tolist(),
        "local": local.tolist(),
        "m": fresh.m.tolist(),
        "v": fresh.v.tolist(),
        "step": fresh.step,
        "folder made": os.path.exists(folder),
    }


def test_only_the_coordinator_writes_and_reads_checkpoints_and_every_site_gets_its_model_and_strategy(tmp_path):
    from tests.ranks import run_on_ranks

    coordinator, site = run_on_ranks(_checkpoint_on_the_coordinator_only, 2, str(tmp_path))
    assert coordinator["folder made"] and not site["folder made"]  # a site touches no checkpoint path
    assert coordinator["found"] and not site["found"]
    assert coordinator["history"] == 2 and site["history"] == 0  # the record is the coordinator's
    for restored in (coordinator, site):
        assert restored["done"] == 2 and restored["step"] == 2
        assert restored["weights"] == restored["local"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        assert restored["m"] == [0.5] * 6 and restored["v"] == [0.25] * 6


@pytest.mark.slow
def test_a_site_killed_mid_run_is_left_behind_and_joins_again_at_a_later_round(tmp_path):
    """min_sites=2 of three invited sites: hospital-b dies (SIGKILL of its process group) when round 3
    starts; hospital-a and -c go on from the round-2 checkpoint; b, started again, waits at the door and
    is back from the next checkpointed round; every round is logged once."""
    files, test = _silos(tmp_path)
    port = _free_port_pair()
    env = {**os.environ, "FL_JOIN_TOKEN": TOKEN}
    names = ["hospital-a", "hospital-b", "hospital-c"]
    site = ["role=site", f"coordinator_address=127.0.0.1:{port}", "insecure=True"]
    coordinator = _start(
        tmp_path,
        "coordinator",
        "role=coordinator",
        f"site_names={names}",
        "min_sites=2",
        f"listen_address=127.0.0.1:{port}",
        "insecure=True",
        "collective_timeout_s=10",
        *CSV,
        *TRAINING,
        "num_rounds=20",
        f"test_path={test}",
        f"checkpoints_dir={tmp_path / 'checkpoints'}",
        "job_name=dropout",
        f"runs_dir={tmp_path / 'runs'}",
        env=env,
    )
    kill_b = {**env, "SCALING_FL_FAIL_AT": "site=2,round=3,mode=kill"}  # b is worker 2 (after the coordinator, a)
    sites = {
        name: _start(
            tmp_path, name, *site, f"site_name={name}", f"train_path={path}", env=kill_b if "-b" in name else env
        )
        for name, path in zip(names, files)
    }
    assert sites["hospital-b"][0].wait(timeout=180) == -signal.SIGKILL
    _wait_for_line(coordinator[1], "sites from round 3: hospital-a, hospital-c; left: hospital-b")
    back = _start(tmp_path, "hospital-b-again", *site, "site_name=hospital-b", f"train_path={files[1]}", env=env)
    for process, log in [coordinator, sites["hospital-a"], sites["hospital-c"], back]:
        assert process.wait(timeout=300) == 0, f"{log.name}:\n{log.read_text()[-4000:]}"

    record = read_record(run_records(tmp_path / "runs")[0])
    assert record["run"]["status"] == "COMPLETED"
    changes = record["info"]["sites"]["changes"]
    assert [(c["after_round"], c["left"], sorted(c["joined"])) for c in changes][0] == (2, ["hospital-b"], [])
    (rejoin,) = changes[1:]
    assert rejoin["left"] == [] and list(rejoin["joined"]) == ["hospital-b"] and 2 < rejoin["after_round"] < 20
    assert rejoin["joined"]["hospital-b"]["rows"] == 10 and rejoin["joined"]["hospital-b"]["site"] == 1
    counted = record["metrics"]["sites.participants"]
    assert counted["steps"] == list(range(1, 21))  # every round logged once, none twice
    back_at = rejoin["after_round"]
    assert counted["values"] == [3, 3] + [2] * (back_at - 2) + [3] * (20 - back_at)
    # The token is in no record, log or checkpoint file.
    assert TOKEN not in json.dumps(record)
    logs = [log.read_text() for _, log in [coordinator, *sites.values(), back]]
    assert all(TOKEN not in text for text in logs)
    checkpoint_files = [path for path in (tmp_path / "checkpoints").rglob("*") if path.is_file()]
    assert checkpoint_files and not any(TOKEN.encode() in path.read_bytes() for path in checkpoint_files)
