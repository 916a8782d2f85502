"""Shared fixtures: real MongoDB / S3 / GCS test servers (see tests/servers.py)."""

import os

# One thread per process: ./dev/test.sh runs a worker per core, each starting jobs of several
# processes, and OpenMP threads that wait on each other's descheduled threads cost more than they
# compute (docs/benchmarks.md, "The test suite on 2 cores"). The sites honour it (sites.threads_per_site).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from tests import cli  # noqa: E402
from tests.servers import (  # noqa: F401 - pytest finds fixtures by name
    gcs_env,
    gcs_server,
    mongo_auth_env,
    mongo_auth_server,
    mongo_env,
    mongo_server,
    s3_env,
    s3_server,
    server_env,
)

# Tests that use one of these start a real server: they belong to the slow tier.
SERVER_FIXTURES = {
    "mongo_server",
    "mongo_auth_server",
    "mongo_env",
    "mongo_auth_env",
    "s3_server",
    "s3_env",
    "gcs_server",
    "gcs_env",
    "server_env",
}


# The files that take longest, longest first (their durations: docs/benchmarks.md). ./dev/test.sh
# hands whole files to the workers in collection order (--no-loadscope-reorder), so the last file a
# worker takes is a short one and the workers finish together; pytest-xdist's own order (most tests
# first) left the Docker module, six tests and about three minutes, among the last.
LONGEST_FIRST = (
    "test_containers.py",
    "test_many_sites.py",
    "test_cross_silo.py",
    "test_reliability.py",
    "test_checkpoints.py",
    "test_tracking_mongo.py",
    "test_exchange_runs.py",
    "test_tracking_file.py",
    "test_claim.py",
    "test_llm_runs.py",
    "test_multinode.py",
    "test_llm.py",
    "test_end_to_end.py",
    "test_storage.py",
    "test_gpu_check.py",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    first = {name: rank for rank, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: the others keep their order


@pytest.fixture(autouse=True)
def _tier_of_this_test(request):
    """Lets tests/cli.py refuse to start the command line from a test outside the slow tier."""
    cli.current_test_is_slow = request.node.get_closest_marker("slow") is not None
    yield
    cli.current_test_is_slow = True
