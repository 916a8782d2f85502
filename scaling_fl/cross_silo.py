"""A cross-silo run: a coordinator and sites, each started on its own, meet at the door and train as one job.

The coordinator (`role=coordinator`) holds the experiment: its config, the test set, the Sacred run
and the checkpoints. It opens the door (scaling_fl/door.py), admits the invited sites, then takes
part in the job as worker 0, which hosts no site: it evaluates the test set, records every round and
writes the checkpoints. Site k (`role=site`, ranked by the door) is worker k + 1 on its own machine
and hosts site k: it reads only its own `train_path`, with the task and columns the coordinator
sent, and reports its row count and label histogram at join, never a row.

The job itself is the multi-node job of launch.py: one node per participant, the coordinator's
node 0 serving torch.distributed's store at its listen port + 1. The round loop is the one that
trains sites in turn (train/federated.py `_federate_sites`), with `Layout.cross_silo` set: each
process scores the evaluation rows it holds, the sizes of the sites are counted where they live,
and only the coordinator reads checkpoints. Site k's data is split by `split_by_file` exactly as
site k of a one-machine rehearsal (`split=none train_path=[a.csv,b.csv,c.csv]`), so both runs
train the same sites on the same rows.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable

import numpy as np

from scaling_fl import checkpoint, door
from scaling_fl.config import DEFAULTS, Config, resolve
from scaling_fl.data.dataset import TextDataset, relabeled
from scaling_fl.data.prepared import PreparedData, reader_columns
from scaling_fl.data.splits import label_histograms, split_by_file
from scaling_fl.data.tasks import READERS, read_training_file, shared_label_names
from scaling_fl.launch import SiteFailure, Topology, run_sites
from scaling_fl.sites import MEMBERSHIP_CHANGE, Layout

log = logging.getLogger("scaling_fl")

# Keys that stay on the machine that set them: they are never sent, and a site may set its own.
COORDINATOR_ONLY = (
    "role",
    "listen_address",
    "site_names",
    "min_sites",
    "num_sites",
    "tls_certfile",
    "tls_keyfile",
    "insecure",
    "join_timeout_s",
    "test_path",
    "tracking",
    "runs_dir",
    "tensorboard_dir",
    "final_model_dir",
    "author",
    "site_ids",
    "processes_per_device",
    "backend",
)
SITE_OWN = (
    "role",
    "coordinator_address",
    "site_name",
    "train_path",
    "site_ids",
    "backend",
    "tls_cafile",
    "insecure",
    "join_timeout_s",
    "config_hash",
)
FIX_LABELS = "the coordinator's test set may only use labels that occur in the sites' files"


# ------------------------------------------------------------------------------------------ coordinator


def coordinator_data(cfg: Config) -> PreparedData:
    """The coordinator's part of the data: the test set, read before the door opens (a bad file is one
    line, before any site waits), with no training rows."""
    columns = reader_columns(cfg)
    if cfg.task_name == "csv":
        from scaling_fl.data import readers

        test = readers.read_generic_csv(
            cfg.test_path,
            columns["text_columns"],
            columns["label_column"],
            prompt_column=columns["prompt_column"],
            response_column=columns["response_column"],
        )
    else:
        test = READERS[cfg.task_name](cfg.test_path)
    return _coordinator_prepared(test, test.label_names, num_sites=0)


def _no_rows(label_names: tuple[str, ...]) -> TextDataset:
    """The set a participant does not hold (the coordinator's training rows, a site's test rows)."""
    return TextDataset(texts=[], labels=np.empty(0, dtype=np.int64), label_names=label_names, source="(no rows)")


def _coordinator_prepared(test: TextDataset, label_names: tuple[str, ...], num_sites: int) -> PreparedData:
    return PreparedData(
        train=_no_rows(label_names),
        test=relabeled(test, label_names, FIX_LABELS),
        parts=[np.empty(0, dtype=np.int64) for _ in range(num_sites)],
    )


def run_config(cfg: Config) -> dict:
    """What every site trains with: the coordinator's config without the keys that stay with it."""
    return {name: value for name, value in cfg.as_dict().items() if name not in COORDINATOR_ONLY}


def coordinate(cfg: Config, prepared: PreparedData, on_event: Callable[[dict], None]) -> dict[int, dict]:
    """Opens the door, waits for the sites (quorum: all, or min_sites at join_timeout_s), then runs the
    job as worker 0. Returns this node's result (run_sites).

    With min_sites below the invited count the run outlives its sites: when one fails or leaves, the
    formation ends (within collective_timeout_s), the others knock again and, after waiting
    collective_timeout_s for everyone, continue from the last checkpoint without it (each site keeps
    its place in site_names, so its seeds and rows do not move; an absent site weighs nothing). A site
    that knocks while a formation trains waits in the door; at the next checkpointed round every
    worker stops and the sites meet again with it. Each change is logged and recorded."""
    token = door.join_token()
    host, port = door.parse_address(cfg.listen_address, "listen_address")
    tls = None if cfg.insecure else door.server_context(cfg.tls_certfile, cfg.tls_keyfile)
    roster = list(cfg.site_names or ())  # every site's place; without site_names: the first formation's
    store_port = port + 1
    label_names: list[tuple[str, ...]] = []

    def announce(arrivals: list[door.Arrival]) -> dict:
        if not label_names:  # fixed at the first formation
            names = shared_label_names([tuple(arrival.label_histogram) for arrival in arrivals])
            relabeled(prepared.test, names, FIX_LABELS)  # fails here, before any site is told to start
            label_names.append(names)
        roster[:] = roster or sorted(arrival.site_name for arrival in arrivals)
        return {"label_names": list(label_names[0]), "sites": roster}

    entrance = door.Door(
        cfg.listen_address,
        token,
        run_config(cfg),
        len(roster) or cfg.num_sites,
        rendezvous=f":{store_port}",  # the coordinator's host, as each site reached it
        min_sites=cfg.min_sites or 0,
        site_names=roster,
        tls=tls,
        announce=announce,
    )
    elastic = outlives_its_sites(cfg)
    try:
        arrivals = entrance.wait_for_sites(cfg.join_timeout_s, keep_open=elastic)
        on_event({"event": "sites_joined", "sites": _reports(arrivals, roster)})
        present, failures = [arrival.site_name for arrival in arrivals], 0
        local = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
        while True:
            topology = Topology(len(present) + 1, 0, local, store_port, sites_per_node=1, workers_per_node=1)
            data = _coordinator_prepared(prepared.test, label_names[0], len(roster))
            folder: list[str] = []
            stop_room = entrance.serve_waiting_room(_flag_writer(folder)) if elastic else None
            try:
                layout = _layout(roster, present, cfg.site_ids[0])
                results = run_sites(cfg, data, topology, layout, on_event, 0, folder.append)
            except SiteFailure as failure:
                failures += 1
                if not elastic or failures > cfg.max_restarts:
                    raise
                log.warning(
                    "the formation of %s ended: %s; the sites meet again (%d of at most %d)",
                    ", ".join(present),
                    str(failure).splitlines()[0],
                    failures,
                    cfg.max_restarts,
                )
                results = None
            finally:
                if stop_room is not None:
                    stop_room()
            if results is not None and "reform" not in results[0]:
                entrance.finish(f"the run finished after round {cfg.num_rounds}")
                return results
            arrivals = entrance.wait_for_sites(
                cfg.join_timeout_s, all_within_s=cfg.collective_timeout_s, keep_open=True
            )
            present = _record_change(cfg, present, arrivals, roster, on_event)
    finally:
        entrance.close()


def outlives_its_sites(cfg: Config) -> bool:
    """Whether the run continues when a site leaves (min_sites below the invited count)."""
    return bool(cfg.min_sites) and cfg.min_sites < len(cfg.site_names or ())


def _record_change(cfg: Config, before: list[str], arrivals, roster: list[str], on_event) -> list[str]:
    """Who left and who came (back) between two formations: a log line and an event for the record."""
    now = [arrival.site_name for arrival in arrivals]
    after = checkpoint.latest(cfg.checkpoints_dir)
    change = {
        "event": "membership",
        "after_round": after.round if after is not None else 0,
        "time": time.time(),
        "sites": now,
        "left": [name for name in before if name not in now],
        "joined": {name: report for name, report in _reports(arrivals, roster).items() if name not in before},
    }
    log.info(
        "sites from round %d: %s%s%s",
        change["after_round"] + 1,
        ", ".join(now),
        f"; left: {', '.join(change['left'])}" if change["left"] else "",
        f"; back or new: {', '.join(change['joined'])}" if change["joined"] else "",
    )
    on_event(change)
    return now


def _flag_writer(folder: list[str]) -> Callable[[list[str]], None]:
    """The waiting room's signal to the coordinator's worker: a file in the job's folder."""

    def write(names: list[str]) -> None:
        flag = os.path.join(folder[0], MEMBERSHIP_CHANGE) if folder else None
        if flag is None or os.path.exists(flag) or not os.path.isdir(folder[0]):  # (gone: the formation ended)
            return
        try:
            with open(flag, "w", encoding="utf-8") as handle:
                json.dump({"waiting": names}, handle)
        except OSError:  # the formation ended meanwhile: they join the next one anyway
            return
        log.info("waiting to join at the next checkpointed round: %s", ", ".join(names))

    return write


def _reports(arrivals: list[door.Arrival], roster: list[str]) -> dict:
    return {
        arrival.site_name: {
            "site": roster.index(arrival.site_name),
            "rows": arrival.rows,
            "label_histogram": arrival.label_histogram,
        }
        for arrival in arrivals
    }


def expected_plan(cfg: Config) -> tuple[Layout, Topology]:
    """The coordinator's plan before the door: every expected site joins (checked against checkpoints)."""
    roster = list(cfg.site_names) if cfg.site_names else [f"site-{k}" for k in range(cfg.num_sites)]
    host, port = door.parse_address(cfg.listen_address, "listen_address")
    return _layout(roster, roster, cfg.site_ids[0]), Topology(len(roster) + 1, 0, host, port + 1, 1, 1)


def _layout(roster: list[str], present: list[str], device: int) -> Layout:
    """Worker 0 (the coordinator) hosts no site; worker k + 1 hosts the k-th present site, at its
    place in the roster (an absent site is hosted nowhere)."""
    hosted = tuple((roster.index(name),) for name in present)
    return Layout(len(roster), (device,), ((),) + hosted, cross_silo=True, site_names=tuple(roster))


# -------------------------------------------------------------------------------------------------- site


def check_site(cfg: Config) -> None:
    """What a site can check before it knocks: the token, its TLS settings, the address."""
    door.join_token()
    door.parse_address(cfg.coordinator_address, "coordinator_address")
    if not cfg.insecure:
        door.client_context(cfg.tls_cafile)


def own_training_keys(cfg: Config, keys_given: list[str]) -> dict:
    """The training keys this site set itself (the door refuses any that differ from the run's)."""
    values = cfg.as_dict()
    return {name: values[name] for name in keys_given if name in DEFAULTS and name not in SITE_OWN}


def site_config(sent: dict, cfg: Config) -> Config:
    """The run's config as this site trains it: the coordinator's keys, this site's own."""
    own = {name: value for name, value in cfg.as_dict().items() if name in SITE_OWN}
    return resolve({**{name: value for name, value in sent.items() if name in DEFAULTS}, **own})


def join_and_train(cfg: Config, keys_given: list[str]) -> dict[int, dict]:
    """Knocks, reads its own file with the run's config, waits for the start and trains its site;
    when a formation ends early (a site left, or one waits to come back) it knocks again, at most
    max_restarts times after a failure. A run that ends while this site waits to (re)join ends this
    site too, without an error: the run is complete, only without it."""
    failures = 0
    while True:
        try:
            results = _join_once(cfg, keys_given)
        except door.RunFinished as finished:
            log.warning("%s; this site has nothing left to train", finished)
            return {0: {"weights_sha256": None}}
        except SiteFailure as failure:
            failures += 1
            if failures > cfg.max_restarts:
                raise
            log.warning("the run's formation ended (%s); knocking again", str(failure).splitlines()[0])
            continue
        result = results[next(iter(results))]
        if "reform" not in result:
            return results
        log.info("a site joins after round %d: knocking again", result["reform"])


def _join_once(cfg: Config, keys_given: list[str]) -> dict[int, dict]:
    """One formation: the door, this site's data, its part of the job."""
    tls = None if cfg.insecure else door.client_context(cfg.tls_cafile)
    read: dict = {}

    def prepare(sent: dict) -> tuple[int, dict[str, int]]:
        run = site_config(sent, cfg)
        columns = reader_columns(run)
        train = read_training_file(
            run.task_name,
            run.train_path,
            columns["text_columns"],
            columns["label_column"],
            columns["prompt_column"],
            columns["response_column"],
        )
        counts = np.bincount(train.labels, minlength=len(train.label_names))
        read.update(config=run, train=train)
        log.info("%s: %d rows of %s", cfg.site_name, len(train), train.source)
        return len(train), {name: int(count) for name, count in zip(train.label_names, counts)}

    admission = door.knock(
        cfg.coordinator_address,
        door.join_token(),
        cfg.site_name,
        prepare,
        config=own_training_keys(cfg, keys_given),
        pinned_hash=cfg.config_hash,
        tls=tls,
        join_timeout_s=cfg.join_timeout_s,
    )
    run: Config = read["config"]
    names = tuple(admission.announced["label_names"])
    roster = list(admission.announced["sites"])
    train = relabeled(read["train"], names, "this site's labels must be among the run's")
    site = roster.index(cfg.site_name)
    rows = [0] * len(roster)
    rows[site] = len(train)
    parts, validation = split_by_file(
        train.labels,
        rows,
        run.data_seed,
        sample_percentage=run.sample_percentage,
        validation_fraction=run.validation_fraction,
    )
    prepared = PreparedData(train=train, test=_no_rows(names), parts=parts, validation=validation)
    log.info(
        "site %s (%d of %d): %d training rows, %d validation rows  %s",
        cfg.site_name,
        site + 1,
        len(roster),
        len(parts[site]),
        len(validation),
        " ".join(f"{n}:{int(c)}" for n, c in zip(names, label_histograms(train.labels, [parts[site]], len(names))[0])),
    )
    store_host, _, store_port = admission.rendezvous.rpartition(":")
    coordinator_host, _ = door.parse_address(cfg.coordinator_address, "coordinator_address")
    present = admission.site_names
    topology = Topology(
        len(present) + 1,
        admission.rank + 1,
        store_host or coordinator_host,
        int(store_port),
        sites_per_node=1,
        workers_per_node=1,
    )
    layout = _layout(roster, present, run.site_ids[0])
    return run_sites(run, prepared, topology, layout, lambda event: None, max_restarts=0)
