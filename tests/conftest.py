"""Shared fixtures: real MongoDB / S3 / GCS test servers (see tests/servers.py)."""

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
