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


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _tier_of_this_test(request):
    """Lets tests/cli.py refuse to start the command line from a test outside the slow tier."""
    cli.current_test_is_slow = request.node.get_closest_marker("slow") is not None
    yield
    cli.current_test_is_slow = True
