"""The round loop: the one file to read to understand a run.

Every site (one torch.distributed rank) runs `run_site`. A round is: train locally ->
exchange turns all sites' updates into their sample-weighted mean -> the strategy
applies it to the global model -> evaluate on the full test set -> rank 0 reports ->
checkpoint. (With sync=periodic or dynamic the exchange may also run between local
steps, or skip a round end; the sync policy decides, identically on every site.)
All sites run the same strategy on the same mean, so they end every round with
bitwise-identical weights and no server process exists that could fail.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from contextlib import contextmanager

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm.contrib.logging import logging_redirect_tqdm

from scaling_fl import checkpoint, models, processes
from scaling_fl.config import Config, participant_count
from scaling_fl.data.prepared import load_worker_data
from scaling_fl.events import EventWriter
from scaling_fl.exchange import (
    broadcast_flat_,
    broadcast_int,
    broadcast_state_,
    gather_from_sites,
    sum_across_sites,
    wait_for_all_sites,
)
from scaling_fl.exchange.dynamic import squared_distance
from scaling_fl.flat_state import flat_sha256, flatten_model_, swap_, trained_names
from scaling_fl.round_buffers import RoundBuffers
from scaling_fl.site_state import SiteStates
from scaling_fl.sites import (
    MEMBERSHIP_CHANGE,
    Layout,
    participants,
    read_layout,
    start_site,
    stop_site,
    trains_sites_in_turn,
)
from scaling_fl.strategies.scaffold import next_site_control
from scaling_fl.train import final, local
from scaling_fl.train.components import (
    exchange_from_config,
    packed_exchange_from_config,
    privacy_from_config,
    strategy_from_config,
    sync_policy_from_config,
    variate_exchange_from_config,
)
from scaling_fl.train.faults import corrupt_update_, maybe_fail
from scaling_fl.train.metrics import RoundClock, SiteTable, round_metrics, site_vector
from scaling_fl.train.objectives import objective_from_config
from scaling_fl.train.progress import progress_bar

log = logging.getLogger("scaling_fl")


@record
def run_site(config: dict, workdir: str) -> dict:
    """Entry point of one site process (started by torch.distributed.elastic)."""
    # The launcher decides what a Ctrl-C means (it stops the sites with SIGTERM); a site never outlives it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    processes.die_with_parent()
    processes.adopt_launcher_output()
    processes.watch_launcher()
    processes.stop_if_permanent_error(workdir)
    result = run_worker(config, workdir)
    # Only on success: a failing site must not close its connections before @record has written
    # its error file, or its peers fail (and are reported) first; the OS closes them on exit.
    stop_site()
    return result


def run_worker(config: dict, workdir: str) -> dict:
    """One worker's whole run, in a site process of its own or in the launcher's process itself
    (launch.run_in_launcher: a single worker on one node)."""
    cfg = Config.from_dict(config)
    layout = read_layout(workdir)
    site = start_site(layout.devices, cfg.backend, cfg.collective_timeout_s)
    _quiet_unless_leader(site.is_leader)
    try:
        with logging_redirect_tqdm():
            if trains_sites_in_turn(cfg, layout):
                return _federate_sites(cfg, site, layout, workdir)
            return _federate(cfg, site, workdir)
    except Exception as error:
        if processes.restart_cannot_fix(error):
            processes.record_permanent_error(workdir, site.rank, error)
        raise


def _federate(cfg: Config, site, workdir: str) -> dict:
    events = EventWriter(os.path.join(workdir, "events.jsonl")) if site.is_leader else None
    if site.is_leader:
        log.info("%d sites, backend %s, device of site 0: %s", site.world_size, site.backend, site.device)

    # --- data: this site's rows and its shards of the validation and test sets ------
    data = load_worker_data(
        os.path.join(workdir, "data"), (site.rank,), site.rank, site.world_size, full_validation=cfg.per_site_metrics
    )
    tokenizer = models.load_tokenizer(cfg.model)
    objective = objective_from_config(cfg, tokenizer, len(data.test_shard.label_names))
    train_set = objective.dataset(data.train[site.rank])
    validation_shard, test_shard, validation_full = _evaluation_sets(data, objective)
    collate = objective.collate
    privacy = privacy_from_config(cfg, site.world_size, participants=site.world_size)
    # every site's share of the mean: by rows, or by training tokens for a causal LM
    site_weights = privacy.weights(_site_sizes(objective, data, {site.rank: train_set}, site.device))
    weight = site_weights[site.rank]

    def evaluate(dataset) -> torch.Tensor:
        return objective.evaluation_sums(
            model, dataset, batch_size=cfg.val_batch_size, precision=cfg.precision, device=site.device
        )

    # --- model: identical start everywhere, the trained state in one flat vector ------
    model = models.build_model(cfg, len(data.test_shard.label_names), tokenizer).to(site.device)
    local_weights = flatten_model_(model)
    trained = trained_names(model)  # what the flat vector holds: all weights, or the LoRA adapters
    bucket_bytes = int(cfg.bucket_size_mb * 2**20)
    broadcast_flat_(local_weights, max(1, bucket_bytes // local_weights.element_size()), src=0)

    # --- strategy (what is done with the mean), exchange (how it is computed), sync policy (when)
    steps = local.steps_per_round(
        len(train_set), cfg.batch_size, cfg.grad_accum_steps, cfg.num_local_epochs, cfg.local_steps
    )
    strategy = strategy_from_config(cfg, local_weights)
    exchange = exchange_from_config(cfg, model, local_weights, site.world_size, site_weights)
    sync_policy = sync_policy_from_config(cfg, steps)
    # Dense FedAvg synchronized every round never reads the previous global model: it keeps no copy.
    keeps_reference = (
        exchange.needs_reference or strategy.needs_reference or sync_policy.needs_reference or privacy.needs_reference
    )
    global_weights = local_weights.clone() if keeps_reference else local_weights
    total_steps = steps * cfg.num_rounds

    # --- resume: the newest complete checkpoint, the same one on every site ------------
    start_round, history, found = _restore(cfg, site, local_weights, global_weights, strategy, exchange, trained)
    privacy.load_state_dict(found.state.get("privacy", {}) if found is not None else {})
    if site.is_leader:
        events.write("start", restart=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), start_round=start_round)
        for past in history:  # rounds a crashed launcher may not have logged yet; it skips the logged ones
            events.write("round", round=past["round"], metrics=past["metrics"])

    communication = CommunicationLog()

    def maybe_synchronize(run_step: int, force: bool = False) -> bool:
        """Asks the sync policy (one scalar collective for sync=dynamic) and exchanges when it says so."""
        started = time.perf_counter()
        synchronized = sync_policy.should_sync(local_weights, global_weights, run_step, force=force)
        if synchronized:
            privacy.clip_(local_weights, global_weights)  # dp=client: this site's update, clipped
            for part in exchange.means(local_weights, global_weights, weight):  # the mean, bucket by bucket
                privacy.noise_(part, (run_step - 1) // steps, site.world_size)  # dp=client: seeded noise
                strategy.apply_(global_weights, part)
            if privacy.adaptive:  # dp_adaptive_clip: the next clip norm from the sites' noisy unclipped count
                privacy.adapt_clip_(_total(privacy.unclipped, site.device), (run_step - 1) // steps, site.world_size)
            communication.add(exchange.stats)
        communication.seconds += time.perf_counter() - started
        return synchronized

    # One bar over all local steps of all rounds (rank 0 only); a line every few % when no terminal sees it.
    progress = progress_bar(total=total_steps, initial=start_round * steps, disable=not site.is_leader, unit="step")
    for round_index in range(start_round, cfg.num_rounds):
        round_number, clock = round_index + 1, RoundClock()
        progress.set_description(f"round {round_number}/{cfg.num_rounds}")
        maybe_fail(site.rank, round_number)
        offset = round_index * steps  # local steps of the run before this round

        # --- 1. local training (sync=periodic / dynamic may synchronize between steps) ----
        train_sums = local.train_site_round(
            model,
            train_set,
            collate,
            cfg,
            site.rank,
            round_index,
            site.device,
            progress=progress,
            after_step=lambda step: step < steps and maybe_synchronize(offset + step),
            objective=objective,
        )
        local_eval = objective.local_summary(evaluate(validation_full)) if validation_full is not None else None
        clock.mark("train")
        clock.move(communication.seconds, "train", "aggregate")  # syncs between local steps

        # --- 2. exchange: mean update over sites, applied by the strategy ----------
        # (sync=round: every round; the last round always ends synchronized)
        in_sync = maybe_synchronize(offset + steps, force=round_number == cfg.num_rounds)
        clock.mark("aggregate")

        # --- 3. evaluate the global model on the validation set (and the test set when due)
        with _global_model_loaded(local_weights, global_weights, needed=not in_sync):
            validation_sums, test_sums = _scored(
                evaluate, validation_shard, test_shard, _test_due(cfg, round_number), site.device
            )
        per_site = gather_from_sites(site_vector(train_sums, site.device, local_eval).to(site.device)).cpu()
        clock.mark("eval")

        # --- 4. report (rank 0 only) -------------------------------------------------
        round_communication = communication.pop(exchange.density)
        sync_stats = sync_policy.pop_stats()
        if site.is_leader:
            metrics = round_metrics(
                validation_sums,
                objective,
                per_site,
                with_per_site=cfg.per_site_metrics,
                cuda=site.device.type == "cuda",
                test_sums=test_sums,
            )
            metrics.update(clock.figures())  # time.aggregate_s: every sync check and exchange
            metrics.update(round_communication)
            metrics.update(sync_stats)
            metrics.update(privacy.figures(round_number))
            metrics["comm.bytes_per_site"] += sync_stats["sync.check_bytes"]  # sync=dynamic's divergence
            metrics[f"train.{objective.unit}_per_s"] = float(per_site[:, 2].sum()) / max(metrics["time.train_s"], 1e-9)
            _report(events, history, round_number, cfg.num_rounds, metrics)
            progress.set_postfix(val_loss=f"{metrics['validation.loss']:.4f}")

        # --- 5. checkpoint: everything a restart needs to replay the next round exactly
        if cfg.checkpoints_dir and (round_number % cfg.checkpoint_every == 0 or round_number == cfg.num_rounds):
            site_state = dict(exchange.state_dict())
            if not in_sync:
                site_state["local"] = local_weights  # this site's model since the last synchronization
            states = {site.rank: site_state} if site_state else {}
            _save_checkpoint(
                cfg, site, site.world_size, round_number, global_weights, strategy, states, history, privacy, trained
            )

    progress.close()
    if site.is_leader:
        _finish(cfg, events, model, tokenizer, objective.num_labels, workdir, site.device)
    return {"rank": site.rank, "weights_sha256": flat_sha256(global_weights)}


def _federate_sites(cfg: Config, worker, layout: Layout, workdir: str) -> dict:
    """The round loop when a worker hosts several sites, or only a sampled fraction of the sites
    trains each round (num_sites / processes_per_device / fraction_fit), or each site's update is
    handled apart (robust aggregation, byzantine sites: sites.trains_sites_in_turn).

    Each round: draw the participants from (seed, round) -> each worker trains its participating
    sites one after another, every one from the round's global model (or, between synchronizations,
    from its own model of the last round) with a fresh optimizer and its own seeds (seed, site,
    round); a synchronizing round encodes each site's update as if it sent alone and adds it into the
    worker's sums -> the workers all_reduce their sums into the participants' mean update (robust
    aggregation: gather every participant's update, bucket by bucket, and reduce it by the rule) -> the
    strategy applies it -> evaluate -> report -> checkpoint. A site trains exactly as it would in a
    process of its own, so packing changes only the order of fp32 sums. Synchronization happens at
    round ends only (launch.check_sync_steps refuses a sync period inside a round).
    """
    events = EventWriter(os.path.join(workdir, "events.jsonl")) if worker.is_leader else None
    hosted = layout.sites[worker.rank]
    if worker.is_leader:
        log.info(
            "%d sites in %d processes, backend %s, device of process 0: %s",
            layout.num_sites,
            worker.world_size,
            worker.backend,
            worker.device,
        )

    # --- data: the rows of every hosted site, this worker's shard of the test set -------
    shard, shards = (0, 1) if layout.cross_silo else (worker.rank, worker.world_size)  # cross-silo: all it holds
    data = load_worker_data(
        os.path.join(workdir, "data"),
        hosted,
        shard,
        shards,
        full_validation=cfg.per_site_metrics,
        validation_is_test=(cfg.validation_fraction == 0) if layout.cross_silo else None,
    )
    tokenizer = models.load_tokenizer(cfg.model)
    objective = objective_from_config(cfg, tokenizer, len(data.test_shard.label_names))
    train_sets = {site: objective.dataset(rows) for site, rows in data.train.items()}
    validation_shard, test_shard, validation_full = _evaluation_sets(data, objective)
    collate = objective.collate
    # rows, or a causal LM's tokens; in a cross-silo run only the host of a site knows its size
    site_rows = _counted_sizes(len, data, train_sets, worker.device) if layout.cross_silo else data.site_sizes
    site_sizes = site_rows if objective.unit == "rows" else _site_sizes(objective, data, train_sets, worker.device)

    # --- model: one working copy per worker, the global model; exchange, strategy, sync policy
    model = models.build_model(cfg, len(data.test_shard.label_names), tokenizer).to(worker.device)
    local_weights = flatten_model_(model)
    trained = trained_names(model)  # what the flat vector holds: all weights, or the LoRA adapters
    bucket_numel = max(1, int(cfg.bucket_size_mb * 2**20) // local_weights.element_size())
    broadcast_flat_(local_weights, bucket_numel, src=0)
    global_weights = local_weights.clone()
    strategy = strategy_from_config(cfg, local_weights)
    exchange = packed_exchange_from_config(cfg, model, local_weights, layout.num_sites)
    # SCAFFOLD: each site's control-variate update, a second dense message (strategies/scaffold.py)
    variates = variate_exchange_from_config(cfg, local_weights)
    steps = local.steps_per_round(
        min(rows for rows in site_rows if rows),
        cfg.batch_size,
        cfg.grad_accum_steps,
        cfg.num_local_epochs,
        cfg.local_steps,
    )  # every site's, when sync is not per round (launch.check_sync_steps)
    sync_policy = sync_policy_from_config(cfg, steps)
    drawn = participant_count(layout.num_sites, cfg.fraction_fit, cfg.min_fit_sites)  # every round
    privacy = privacy_from_config(cfg, layout.num_sites, participants=drawn)
    site_states = SiteStates(cfg.site_state_offload, worker.device, os.path.join(workdir, f"site-state-{worker.rank}"))
    round_buffers = RoundBuffers(
        cfg.round_buffers_offload, worker.device, os.path.join(workdir, f"round-buffers-{worker.rank}")
    )

    def unread_in_training() -> list[torch.Tensor]:
        """What local training never reads: away from the process while a site trains (round_buffers_offload)."""
        strategy_state = [t for t in strategy.state_dict().values() if t.numel() == global_weights.numel()]  # moments
        exchanges = (exchange, variates) if variates is not None else (exchange,)
        return [global_weights, *strategy_state, *(buffer for each in exchanges for buffer in each.round_buffers())]

    start_round, history, found = _restore(
        cfg, worker, local_weights, global_weights, strategy, None, trained, leader_reads_only=layout.cross_silo
    )
    privacy.load_state_dict(found.state.get("privacy", {}) if found is not None else {})
    for site in hosted if found is not None else ():  # sites that never trained have no state
        if found.has(checkpoint.site_file(site)):
            site_states.load(site, found.tensors(checkpoint.site_file(site)))
    if worker.is_leader:
        events.write("start", restart=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), start_round=start_round)
        for past in history:
            events.write("round", round=past["round"], metrics=past["metrics"])

    def evaluate(dataset) -> torch.Tensor:
        return objective.evaluation_sums(
            model, dataset, batch_size=cfg.val_batch_size, precision=cfg.precision, device=worker.device
        )

    def send(site: int, share: float) -> None:
        """Encodes the site's update (local_weights) as if it sent alone, into the worker's sums."""
        state = site_states.checkout(site, exchange.state_shapes)
        if site in cfg.byzantine_sites:  # fault injection: this site lies about its update
            corrupt_update_(local_weights, global_weights, cfg.byzantine_mode, cfg.byzantine_scale)
        privacy.clip_(local_weights, global_weights)  # dp=client: the site's update, clipped
        exchange.add_site_(local_weights, global_weights, share, site=site, **state)
        site_states.checkin(site, state)

    progress = progress_bar(total=cfg.num_rounds, initial=start_round, disable=not worker.is_leader, unit="round")
    for round_index in range(start_round, cfg.num_rounds):
        round_number, clock = round_index + 1, RoundClock()
        maybe_fail(worker.rank, round_number)
        chosen = participants(cfg.seed, round_index, layout.num_sites, cfg.fraction_fit, cfg.min_fit_sites)
        if layout.cross_silo:  # an invited site that is not in this formation (it left, or never came)
            chosen = [site for site in chosen if site_sizes[site] > 0]
        mine = sorted(set(hosted) & set(chosen))
        share = dict(zip(chosen, privacy.weights([site_sizes[site] for site in chosen]), strict=True))
        last_step, last_round = round_number * steps, round_number == cfg.num_rounds
        deciding_later = sync_policy.needs_divergence(last_step) and not last_round  # sync=dynamic's checks
        synchronize = None if deciding_later else sync_policy.decide(last_step, force=last_round)

        # --- 1. local training of this worker's participating sites, one after another ------------
        site_table, divergence = SiteTable(layout.num_sites, worker.device), 0.0
        for site in mine:
            unsynced = site_states.take(site, "local")  # its own model since the last synchronization
            local_weights.copy_(unsynced if unsynced is not None else global_weights)
            own_control = _site_control(site_states, site, global_weights) if variates is not None else None
            correction = None if own_control is None else strategy.control - own_control  # SCAFFOLD
            with round_buffers.away(unread_in_training()):
                sums = local.train_site_round(
                    model,
                    train_sets[site],
                    collate,
                    cfg,
                    site,
                    round_index,
                    worker.device,
                    control_correction=correction,
                    objective=objective,
                )
                local_eval = objective.local_summary(evaluate(validation_full)) if validation_full is not None else None
            site_table.add(site, sums, local_eval)
            if own_control is not None:  # SCAFFOLD option II: the site's new variate, its change summed
                new_control = next_site_control(
                    own_control, strategy.control, local_weights, global_weights, sums.lr_sum
                )
                variates.add_site_(new_control.sub(own_control), global_weights, 1.0 / layout.num_sites)
                site_states.keep(site, "control", new_control)
            if synchronize:
                send(site, share[site])
            else:
                site_states.keep(site, "local", local_weights)
                if deciding_later:
                    divergence = max(divergence, squared_distance(local_weights, global_weights))
        clock.mark("train")

        # --- 2. synchronize: the workers' sums -> the mean update, applied by the strategy ----------
        if deciding_later:  # one scalar all_reduce(MAX) of the sites' divergence decides for everyone
            synchronize = sync_policy.decide(last_step, divergence=divergence, device=worker.device)
            for site in mine if synchronize else ():
                local_weights.copy_(site_states.take(site, "local"))
                send(site, share[site])
        for part in exchange.means(global_weights) if synchronize else ():
            privacy.noise_(part, round_index, len(chosen))  # dp=client: seeded noise on the mean
            strategy.apply_(global_weights, part)
        if privacy.adaptive and synchronize:  # dp_adaptive_clip: the next clip norm from the noisy unclipped count
            privacy.adapt_clip_(_total(privacy.unclipped, worker.device), round_index, len(chosen))
        for part in variates.means(global_weights) if variates is not None else ():
            strategy.apply_control_(part)  # SCAFFOLD: c += sum of the participants' variate changes / N
        communication = exchange.stats if synchronize else exchange.idle_stats()
        if variates is not None:
            communication = _with_variates(communication, variates.stats)
        local_weights.copy_(global_weights)  # evaluate the model every site agrees on
        clock.mark("aggregate")

        # --- 3. evaluate the global model on the validation set (and the test set when due) -------
        validation_sums, test_sums = _scored(
            evaluate, validation_shard, test_shard, _test_due(cfg, round_number), worker.device
        )
        per_site, peak_memory = site_table.gathered()
        clock.mark("eval")

        # --- 4. report (worker 0 only) --------------------------------------------------------------
        if worker.is_leader:
            metrics = round_metrics(
                validation_sums,
                objective,
                per_site[chosen],
                with_per_site=cfg.per_site_metrics or layout.cross_silo,  # cross-silo: always, by site name
                cuda=worker.device.type == "cuda",
                site_ids=[layout.site_label(site) for site in chosen],
                test_sums=test_sums,
            )
            metrics.update(peak_memory)
            metrics.update(clock.figures())
            metrics.update(communication)
            metrics.update(sync_policy.pop_stats())
            metrics.update(privacy.figures(round_number))
            metrics["comm.bytes_per_site"] += metrics["sync.check_bytes"]  # sync=dynamic's divergence
            metrics.update({"memory.site_state_mb": site_states.nbytes() / 2**20, "sites.participants": len(chosen)})
            metrics[f"train.{objective.unit}_per_s"] = float(per_site[chosen, 2].sum()) / max(
                metrics["time.train_s"], 1e-9
            )
            _report(events, history, round_number, cfg.num_rounds, metrics, participants=chosen)
            progress.update(1)

        # --- 5. checkpoint: the global model, the strategy and every hosted site's state ------------
        checkpointed = cfg.checkpoints_dir and (round_number % cfg.checkpoint_every == 0 or last_round)
        if checkpointed:
            states = {site: site_states.state_of(site) for site in site_states.sites()}
            _save_checkpoint(
                cfg, worker, layout.num_sites, round_number, global_weights, strategy, states, history, privacy, trained
            )

        # --- 6. cross-silo: a site waits to come (back) in; all stop here and meet again with it ---------
        if layout.cross_silo and checkpointed and not last_round:
            waiting = worker.is_leader and os.path.exists(os.path.join(workdir, MEMBERSHIP_CHANGE))
            if broadcast_int(int(waiting), worker.device):
                progress.close()
                return {"rank": worker.rank, "weights_sha256": flat_sha256(global_weights), "reform": round_number}

    progress.close()
    if worker.is_leader:
        _finish(cfg, events, model, tokenizer, objective.num_labels, workdir, worker.device)
    return {"rank": worker.rank, "weights_sha256": flat_sha256(global_weights)}


def _evaluation_sets(data, objective):
    """(validation shard, test shard, the full validation set or None), tokenized; without a validation
    set (validation_fraction=0) the validation shard IS the test shard, scored once a round."""
    validation = objective.dataset(data.validation_shard)
    test = validation if data.test_shard is data.validation_shard else objective.dataset(data.test_shard)
    full = data.validation_full
    return validation, test, objective.dataset(full) if full else None


def _site_sizes(objective, data, train_sets: dict, device: torch.device) -> list[int]:
    """Every site's weight in the mean: its rows (known to every process from the split), or, for a
    causal LM, its training tokens, counted by the processes that host the sites and summed over all."""
    if objective.unit == "rows":
        return list(data.site_sizes)
    return _counted_sizes(objective.site_size, data, train_sets, device)


def _counted_sizes(size_of, data, train_sets: dict, device: torch.device) -> list[int]:
    """size_of(dataset) of every site, from the processes that host them (collective: all call it)."""
    counts = torch.zeros(len(data.site_sizes), dtype=torch.int64)
    for site, dataset in train_sets.items():
        counts[site] = size_of(dataset)
    return [int(count) for count in sum_across_sites(counts.to(device)).cpu()]


def _test_due(cfg: Config, round_number: int) -> bool:
    """The test set is scored after the last round, and every `test_every` rounds when set."""
    return round_number == cfg.num_rounds or (cfg.test_every > 0 and round_number % cfg.test_every == 0)


def _scored(evaluate, validation, test, test_due: bool, device: torch.device):
    """The global model's [loss_sum, confusion...] on the validation set, and on the test set when due
    (None otherwise), each summed over all processes' shards (collectives: every process calls it)."""

    def summed(dataset) -> torch.Tensor:
        return sum_across_sites(evaluate(dataset).to(device)).cpu()

    validation_sums = summed(validation)
    if not test_due:
        return validation_sums, None
    return validation_sums, validation_sums if test is validation else summed(test)


def _total(count: int, device: torch.device) -> int:
    """A count summed over all processes."""
    return int(sum_across_sites(torch.tensor([count], dtype=torch.int64, device=device)).item())


def _site_control(site_states: SiteStates, site: int, like: torch.Tensor) -> torch.Tensor:
    """SCAFFOLD's c_i of a site (zeros before its first round), taken out of its state until kept again."""
    held = site_states.take(site, "control")
    return torch.zeros_like(like) if held is None else held.to(like.device)


def _with_variates(communication: dict, variates: dict) -> dict:
    """The round's figures with SCAFFOLD's variate messages counted in (they cross the wire too)."""
    out = dict(communication)
    for key in ("comm.bytes_per_site", "comm.wire_bytes_per_site", "comm.worker_bytes", "comm.worker_wire_bytes"):
        out[key] = out.get(key, 0) + variates.get(key, 0)
    out["memory.exchange_peak_mb"] = out.get("memory.exchange_peak_mb", 0.0) + variates["memory.exchange_peak_mb"]
    return out


def _report(events: EventWriter, history: list, round_number: int, num_rounds: int, metrics: dict, **extra) -> None:
    """The leader's round: an event for the launcher (Sacred records it), the history a checkpoint
    keeps, and one log line."""
    events.write("round", round=round_number, metrics=metrics, **extra)
    history.append({"round": round_number, "metrics": metrics})
    scores = "  ".join(
        f"{label} {metrics[name]:.4f}"
        for label, name in (
            ("val_acc", "validation.accuracy"),
            ("val_loss", "validation.loss"),
            ("val_ppl", "validation.perplexity"),
            ("f1", "validation.f1_macro"),
            ("train_loss", "train.loss"),
        )
        if name in metrics
    )
    log.info(
        "round %d/%d  %s%s  %.0f kB/site  %.1fs",
        round_number,
        num_rounds,
        f"{len(extra['participants'])} sites " if "participants" in extra else "",
        scores,
        metrics["comm.bytes_per_site"] / 1e3,
        metrics["time.round_s"],
    )


class CommunicationLog:
    """What the exchanges of one round sent, how long they (and the sync checks) took, their peak memory."""

    def __init__(self):
        self.seconds, self.bytes, self.wire_bytes, self.peak_mb, self.density = 0.0, 0, 0, 0.0, None

    def add(self, stats: dict) -> None:
        self.bytes += int(stats["comm.bytes_per_site"])
        self.wire_bytes += int(stats.get("comm.wire_bytes_per_site", 0))
        self.peak_mb = max(self.peak_mb, float(stats.get("memory.exchange_peak_mb", 0.0)))
        self.density = float(stats.get("comm.density", 1.0))

    def pop(self, configured_density: float) -> dict:
        """The round's figures (density: of the last exchange, or the configured one); resets the log."""
        figures = {
            "comm.bytes_per_site": self.bytes,
            "comm.wire_bytes_per_site": self.wire_bytes,
            "comm.density": self.density if self.density is not None else float(configured_density),
            "memory.exchange_peak_mb": self.peak_mb,
        }
        self.__init__()
        return figures


@contextmanager
def _global_model_loaded(local_weights: torch.Tensor, global_weights: torch.Tensor, needed: bool):
    """Puts the global model into the model's weights for a while (sites not synchronized this round
    evaluate what they agree on, the last synchronized model), then gives each site its own back."""
    if needed:
        swap_(local_weights, global_weights)
    try:
        yield
    finally:
        if needed:
            swap_(local_weights, global_weights)


def _restore(
    cfg: Config,
    site,
    local_weights: torch.Tensor,
    global_weights: torch.Tensor,
    strategy,
    exchange,
    trained,
    leader_reads_only: bool = False,
) -> tuple[int, list, checkpoint.Checkpoint | None]:
    """Loads the newest checkpoint of checkpoints_dir / resume_from into every site; returns (rounds done,
    history, the checkpoint).

    Site 0 chooses and broadcasts (source, round), so every site loads the very same files.
    Each site also takes back its own state: its error-feedback residual, and its local model
    when the checkpointed round ended between synchronizations. leader_reads_only (cross-silo: the
    checkpoints lie on the coordinator's side): rank 0 loads the global model and the strategy's
    state and broadcasts them; the others get no checkpoint back (they hold no per-site state).
    """
    sources = [path for path in (cfg.checkpoints_dir, cfg.resume_from) if path]
    source, chosen_round = -1, 0
    if site.is_leader:
        for index, path in enumerate(sources):
            found = checkpoint.latest(path) if index == 0 and cfg.checkpoints_dir else checkpoint.open_checkpoint(path)
            if found is not None and found.round > chosen_round:
                source, chosen_round = index, found.round
    source = broadcast_int(source, site.device)
    chosen_round = broadcast_int(chosen_round, site.device)
    if source < 0:
        return 0, [], None
    if leader_reads_only and not site.is_leader:
        _share_restored(cfg, local_weights, global_weights, strategy)
        return chosen_round, [], None
    path = sources[source]
    found = (
        checkpoint.verify(checkpoint.round_dir(path, chosen_round))
        if path == cfg.checkpoints_dir
        else checkpoint.open_checkpoint(path)
    )
    weights = found.tensors("global.safetensors")["global"]
    held = [tuple(entry) for entry in found.state.get("trained_tensors", [])]
    if held and held != [tuple(entry) for entry in trained]:
        raise checkpoint.CheckpointError(
            f"{found.directory} holds {len(held)} trained tensors ({held[0][0]}, ...), this run trains "
            f"{len(trained)} ({trained[0][0]}, ...): another model, peft or lora setting; "
            "use another checkpoints_dir"
        )
    if weights.numel() != global_weights.numel():
        raise checkpoint.CheckpointError(
            f"{found.directory} holds {weights.numel()} weights, the model has "
            f"{global_weights.numel()}: a different model"
        )
    global_weights.copy_(weights.to(global_weights.device))
    local_weights.copy_(global_weights)
    strategy.load_state_dict(found.tensors("strategy.safetensors") if found.has("strategy.safetensors") else {})
    if leader_reads_only:
        _share_restored(cfg, local_weights, global_weights, strategy)
        log.info("resumed from %s: continuing at round %d", found.directory, found.round + 1)
        return found.round, list(found.state.get("history", [])), found
    own = found.tensors(checkpoint.site_file(site.rank)) if found.has(checkpoint.site_file(site.rank)) else {}
    if "local" in own:
        local_weights.copy_(own["local"].to(local_weights.device))
    if (
        exchange is not None and exchange.residual is not None
    ):  # (a residual without an exchange that keeps one: only after resume=force)
        if "residual" in own:
            exchange.load_state_dict({"residual": own["residual"].to(local_weights.device)})
        else:
            log.warning("site %d: %s holds no error-feedback residual; starting from zero", site.rank, found.directory)
    if site.is_leader:
        log.info("resumed from %s: continuing at round %d", found.directory, found.round + 1)
    return found.round, list(found.state.get("history", [])), found


def _share_restored(cfg: Config, local_weights: torch.Tensor, global_weights: torch.Tensor, strategy) -> None:
    """Rank 0's restored global model and strategy state, on every rank."""
    broadcast_flat_(global_weights, max(1, int(cfg.bucket_size_mb * 2**20) // global_weights.element_size()), src=0)
    local_weights.copy_(global_weights)
    state = strategy.state_dict()
    broadcast_state_(state, src=0)
    strategy.load_state_dict(state)


def _save_checkpoint(
    cfg: Config,
    site,
    num_sites: int,
    round_number: int,
    global_weights: torch.Tensor,
    strategy,
    site_states: dict[int, dict[str, torch.Tensor]],
    history,
    privacy,
    trained: list[tuple[str, int]],
) -> None:
    directory = checkpoint.round_dir(cfg.checkpoints_dir, round_number)
    # Every process writes the state of the sites it hosts first (one file per site, so a checkpoint
    # resumes in any packing); the leader seals the folder after all of them.
    for number, state in site_states.items():
        checkpoint.write_tensors(directory, checkpoint.site_file(number), state)
    wait_for_all_sites()
    if site.is_leader:
        checkpoint.write_tensors(
            directory,
            "global.safetensors",
            {"global": global_weights},
            metadata={"numel": global_weights.numel(), "sha256": flat_sha256(global_weights)},
        )
        if strategy.state_dict():
            checkpoint.write_tensors(directory, "strategy.safetensors", strategy.state_dict())
        defining = checkpoint.defining_config(cfg.as_dict(), num_sites)
        checkpoint.write_state(
            directory,
            {
                "format": checkpoint.FORMAT_VERSION,
                "round": round_number,
                "job_name": cfg.job_name,
                "defining_config": defining,
                "config_hash": checkpoint.config_hash(defining),
                # Batch order and dropout are seeded from (seed, site, round): the round number is the RNG state.
                "rng": {"seed": cfg.seed, "data_seed": cfg.data_seed, "derived_from": "seed, site, round"},
                "history": history,
                "privacy": privacy.state_dict(),  # dp_adaptive_clip: the next round's clip norm
                "trained_tensors": trained,  # (name, numel) of the flat vector's tensors, in its order
            },
        )
        checkpoint.commit(directory)
        checkpoint.prune(cfg.checkpoints_dir, cfg.keep_last_checkpoints)


def _finish(cfg: Config, events: EventWriter, model, tokenizer, num_labels: int, workdir: str, device) -> None:
    """After the last round (the leader only): the sample generations, then the final model's folder."""
    if cfg.sample_prompts:
        samples = final.generate_samples(model, tokenizer, cfg.sample_prompts, cfg.sample_max_new_tokens, device)
        events.write("samples", path=final.write_samples(samples, os.path.join(workdir, "samples.json")))
    if cfg.save_final_model:
        path = final.save_final_model(cfg, model, tokenizer, num_labels, os.path.join(workdir, "final_model"))
        events.write("final_model", path=path)


def _quiet_unless_leader(is_leader: bool) -> None:
    """Rank 0 talks; the other sites only speak up when something fails."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.basicConfig(
        level=logging.INFO if is_leader else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
