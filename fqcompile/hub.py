"""Reaching the Hugging Face hub: fail fast and clearly where there is no network."""

import os
import socket
from urllib.parse import urlparse

from .errors import FqError


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def require_hub(what: str, timeout: float = 5.0) -> None:
    """Raise FqError unless the hub endpoint answers a TCP connect within `timeout` s.

    huggingface_hub retries for ~25 s before giving up; a user who typed a typo'd
    local path deserves an answer in seconds.
    """
    if offline():
        return  # the caller reads from the local HF cache only
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise FqError(
            f"{what} needs the Hugging Face hub, but {url.hostname} cannot be reached "
            f"({exc.strerror or exc}); pass a local folder or file instead"
        ) from None
