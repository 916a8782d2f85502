"""The Hugging Face Hub as the launcher sees it: offline mode, the endpoint and a quick probe.

transformers and datasets retry an unreachable Hub for tens of seconds before they give up;
one probe first lets an offline machine fail in seconds with one line that names the fix.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

PROBE_TIMEOUT_S = 5.0


def offline_mode() -> bool:
    """What huggingface_hub will do: it reads HF_HUB_OFFLINE once, at import."""
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def endpoint() -> str:
    try:
        from huggingface_hub import constants

        return constants.ENDPOINT
    except ImportError:
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def reachable(url: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """False in offline mode; otherwise any HTTP answer from `url` (default: the endpoint) counts as
    reachable. urllib honours the proxy variables, as the Hugging Face libraries do."""
    if url is None:
        if offline_mode():
            return False
        url = endpoint()
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False
