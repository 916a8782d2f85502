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

import logging
from collections.abc import Callable

import numpy as np

from scaling_fl import door
from scaling_fl.config import DEFAULTS, Config, resolve
from scaling_fl.data.dataset import TextDataset, relabeled
from scaling_fl.data.prepared import PreparedData, reader_columns
from scaling_fl.data.splits import label_histograms, split_by_file
from scaling_fl.data.tasks import READERS, read_training_file, shared_label_names
from scaling_fl.launch import Topology, run_sites
from scaling_fl.sites import Layout

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


def _coordinator_prepared(test: TextDataset, label_names: tuple[str, ...], num_sites: int) -> PreparedData:
    nothing = TextDataset(texts=[], labels=np.empty(0, dtype=np.int64), label_names=label_names, source="(no rows)")
    return PreparedData(
        train=nothing,
        test=relabeled(test, label_names, FIX_LABELS),
        parts=[np.empty(0, dtype=np.int64) for _ in range(num_sites)],
    )


def run_config(cfg: Config) -> dict:
    """What every site trains with: the coordinator's config without the keys that stay with it."""
    return {name: value for name, value in cfg.as_dict().items() if name not in COORDINATOR_ONLY}


def coordinate(cfg: Config, prepared: PreparedData, on_event: Callable[[dict], None]) -> dict[int, dict]:
    """Opens the door, waits for the sites (quorum: all, or min_sites at join_timeout_s), then runs the
    job as worker 0. Returns this node's result (run_sites)."""
    token = door.join_token()
    host, port = door.parse_address(cfg.listen_address, "listen_address")
    tls = None if cfg.insecure else door.server_context(cfg.tls_certfile, cfg.tls_keyfile)
    expected = len(cfg.site_names) if cfg.site_names else cfg.num_sites
    store_port = port + 1
    label_names: list[tuple[str, ...]] = []

    def announce(arrivals: list[door.Arrival]) -> dict:
        names = shared_label_names([tuple(arrival.label_histogram) for arrival in arrivals])
        relabeled(prepared.test, names, FIX_LABELS)  # fails here, before any site is told to start
        label_names.append(names)
        return {"label_names": list(names)}

    entrance = door.Door(
        cfg.listen_address,
        token,
        run_config(cfg),
        expected,
        rendezvous=f":{store_port}",  # the coordinator's host, as each site reached it
        min_sites=cfg.min_sites or 0,
        site_names=cfg.site_names or (),
        tls=tls,
        announce=announce,
    )
    arrivals = entrance.wait_for_sites(cfg.join_timeout_s)
    on_event(
        {
            "event": "sites_joined",
            "sites": {
                arrival.site_name: {"rank": rank + 1, "rows": arrival.rows, "label_histogram": arrival.label_histogram}
                for rank, arrival in enumerate(arrivals)
            },
        }
    )
    joined = len(arrivals)
    local = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    topology = Topology(joined + 1, 0, local, store_port, sites_per_node=1, workers_per_node=1)
    layout = _layout(joined, cfg.site_ids[0])
    data = _coordinator_prepared(prepared.test, label_names[0], joined)
    return run_sites(cfg, data, topology, layout, on_event, max_restarts=0)


def expected_plan(cfg: Config) -> tuple[Layout, Topology]:
    """The coordinator's plan before the door: every expected site joins (checked against checkpoints)."""
    expected = len(cfg.site_names) if cfg.site_names else cfg.num_sites
    host, port = door.parse_address(cfg.listen_address, "listen_address")
    return _layout(expected, cfg.site_ids[0]), Topology(expected + 1, 0, host, port + 1, 1, 1)


def _layout(num_sites: int, device: int) -> Layout:
    """Worker 0 (the coordinator) hosts no site, worker k + 1 hosts site k."""
    return Layout(num_sites, (device,), ((),) + tuple((site,) for site in range(num_sites)), cross_silo=True)


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
    """Knocks, reads its own file with the run's config, waits for the start and trains its site."""
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
    train = relabeled(read["train"], names, "this site's labels must be among the run's")
    num_sites, site = len(admission.site_names), admission.rank
    rows = [0] * num_sites
    rows[site] = len(train)
    parts, validation = split_by_file(
        train.labels,
        rows,
        run.data_seed,
        sample_percentage=run.sample_percentage,
        validation_fraction=run.validation_fraction,
    )
    nothing = TextDataset(texts=[], labels=np.empty(0, dtype=np.int64), label_names=names, source="(no test rows)")
    prepared = PreparedData(train=train, test=nothing, parts=parts, validation=validation)
    log.info(
        "site %s (%d of %d): %d training rows, %d validation rows  %s",
        cfg.site_name,
        site + 1,
        num_sites,
        len(parts[site]),
        len(validation),
        " ".join(f"{n}:{int(c)}" for n, c in zip(names, label_histograms(train.labels, [parts[site]], len(names))[0])),
    )
    store_host, _, store_port = admission.rendezvous.rpartition(":")
    coordinator_host, _ = door.parse_address(cfg.coordinator_address, "coordinator_address")
    topology = Topology(
        num_sites + 1, site + 1, store_host or coordinator_host, int(store_port), sites_per_node=1, workers_per_node=1
    )
    return run_sites(run, prepared, topology, _layout(num_sites, run.site_ids[0]), lambda event: None, max_restarts=0)
