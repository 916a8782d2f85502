"""Command line front end: Sacred's `with key=value` syntax plus a friendly unknown-key check."""

from __future__ import annotations

import atexit
import difflib
import logging
import os
import sys
import traceback
import warnings

OBSERVER_FLAGS = ("-F", "--file_storage", "-m", "--mongo_db", "-s", "--sql", "-t", "--tiny_db", "--s3")


def _with_items(argv: list[str]) -> list[str]:
    """The items after `with`, up to the first option (named configs and files included)."""
    items = []
    for token in argv[argv.index("with") + 1 :] if "with" in argv else []:
        if token.startswith("-") and "=" not in token:
            break
        items.append(token)
    return items


def _config_keys_given(argv: list[str]) -> list[str]:
    return [item.split("=", 1)[0].strip() for item in _with_items(argv) if "=" in item]


def _runs_main_command(argv: list[str]) -> bool:
    """True unless Sacred is asked for its usage (help, -h, --help: the config keys' listing) or another
    command (print_config, ...): the main command is the only one that starts sites."""
    rest = argv[1:]
    if "-h" in rest or "--help" in rest:
        return False
    return not rest or rest[0] == "with" or rest[0].startswith("-")


def _forks_sites(argv: list[str], environ: dict | None = None) -> bool:
    """Whether this start forks site processes, so the fork server is worth starting before anything
    else. False only when the command line alone says one worker on one node (that worker runs in
    this process, launch.runs_in_launcher); what it cannot tell (a named config, a config file, a
    multi-node environment, a value the config refuses) counts as yes: the server is then merely
    started, in parallel, a little early."""
    import ast

    from scaling_fl.config import resolve
    from scaling_fl.sites import plan_layout

    environ = os.environ if environ is None else environ
    if any(name in environ for name in ("WORLD_SIZE", "RANK", "SLURM_NNODES", "TORCHELASTIC_RUN_ID")):
        return True
    raw = {}
    for token in _with_items(argv):
        if "=" not in token:
            return True
        key, value = token.split("=", 1)
        try:
            raw[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raw[key.strip()] = value
    try:
        cfg = resolve(raw)
    except Exception:  # noqa: BLE001 - the real check reports it, with its line
        return True
    if cfg.role != "simulation":
        return True
    layouts = [plan_layout(cfg.site_ids, cfg.num_sites, cfg.processes_per_device, cuda=cuda) for cuda in (False, True)]
    return any(layout.num_workers > 1 for layout in layouts)


def load_dotenv_file() -> None:
    """Variables from ./.env (the current directory), as run-local.sh and compose read it;
    variables already set in the environment win."""
    from dotenv import load_dotenv

    load_dotenv(os.path.join(os.getcwd(), ".env"), override=False)


def check_command_line(argv: list[str]) -> None:
    """What Sacred would accept but must not run: unknown config keys, credentials in the record."""
    from scaling_fl.config import DEFAULTS, ConfigError

    for key in _config_keys_given(argv):
        if key.split(".")[0] not in DEFAULTS:
            close = difflib.get_close_matches(key, DEFAULTS, n=1)
            hint = f"did you mean {close[0]}?" if close else "see the config table in the README"
            raise ConfigError(f"unknown config key {key!r}: {hint}")
    for index, arg in enumerate(argv):  # Sacred records its command line options in the run
        value = arg.split("=", 1)[1] if "=" in arg else (argv[index + 1] if index + 1 < len(argv) else "")
        if arg.split("=", 1)[0] in ("-m", "--mongo_db") and "@" in value:
            raise ConfigError(
                "credentials on the command line end up in the run record; "
                "set SACRED_URL (or SACRED_USER / SACRED_PASSWORD / SACRED_HOST) in .env instead"
            )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    load_dotenv_file()  # before anything reads SACRED_* / AWS_* (and before the sites inherit the environment)
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")

    from scaling_fl.errors import EXIT_BAD_INPUT, EXIT_RECORD_LOST, UserError, print_error

    try:
        check_command_line(argv)
    except UserError as error:
        print_error(error)
        raise SystemExit(EXIT_BAD_INPUT) from None

    # Spawned sites start multiprocessing's resource tracker, which lives as long as this
    # process. Started now, it holds the terminal, not the pipe Sacred captures output
    # through, so Sacred does not wait for that pipe to close when the run ends.
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()

    from scaling_fl import processes

    if _runs_main_command(argv) and _forks_sites(argv):  # its imports overlap the launcher's (seconds per start)
        processes.start_fork_server()
    with processes.imports_without_gc():
        from scaling_fl import job
        from scaling_fl.tracking import experiment

    experiment.keys_given = _config_keys_given(argv)
    experiment.explicit_observers = any(flag in argv for flag in OBSERVER_FLAGS) or any(
        arg.startswith(tuple(f"{flag}=" for flag in OBSERVER_FLAGS if flag.startswith("--"))) for arg in argv
    )
    processes.InterruptHandler().install()
    try:
        run = experiment.ex.run_commandline(argv)
    except processes.Interrupted as stop:
        print(f"scaling-fl: {experiment.interrupted_line(stop)}", file=sys.stderr, flush=True)
        raise SystemExit(stop.exit_code) from None
    finally:
        job.release_claims()
    lost = experiment.lost_record_line(run)
    if lost:
        print(f"scaling-fl: error: {lost}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_RECORD_LOST)


def run_and_exit(argv: list[str] | None = None) -> None:
    """`main`, then the process ends without the interpreter's teardown: with torch and
    transformers loaded that takes about a second on a small machine and frees nothing the
    OS would not. Everything that writes was closed by then (run record, claims, sites);
    the exit functions and the output buffers are run and flushed here first."""
    code: int | str | None = 0
    try:
        main(argv)
    except SystemExit as stop:
        code = stop.code
    except BaseException:  # an unexpected error: the traceback Python would print, exit code 1
        traceback.print_exc()
        code = 1
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()  # private but stable since Python 3.0 (tests/test_processes.py checks it)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code or 0)


if __name__ == "__main__":
    run_and_exit()
