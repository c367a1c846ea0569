"""The S3 client every store module uses, and what its errors mean: the store is down (serve what is cached,
answer 503) or it answered about the object (400/404)."""

from __future__ import annotations

_MISSING = {"404", "NoSuchKey", "NotFound"}
# Answers that say the store will not serve us now (throttling, expired or wrong credentials), as opposed to an
# answer about the object: the cached copy keeps serving and the client gets 503, not 400/404.
_RETRY_LATER = {"SlowDown", "RequestTimeout", "ServiceUnavailable", "AccessDenied", "ExpiredToken",
                "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "403"}


def s3_client():
    import boto3  # only deployments with s3:// locations need boto3 loaded
    from botocore.config import Config

    # Short timeouts and few retries: a request waits on this call, and a store that is down must fail fast
    # into "serve the cached copy" or a clear 503, not hang the client.
    return boto3.session.Session().client("s3", config=Config(
        connect_timeout=2, read_timeout=20, retries={"max_attempts": 2, "mode": "standard"}))


def error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", "")) or str(
        response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def missing(exc: Exception) -> bool:
    """The store says the object (or folder) does not exist."""
    return error_code(exc) in _MISSING


def unreachable(exc: Exception) -> bool:
    """The store is down or refuses us (retry later), as opposed to an answer about the object."""
    from botocore.exceptions import BotoCoreError, ClientError
    from s3transfer.exceptions import RetriesExceededError

    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or error_code(exc) in _RETRY_LATER
    return isinstance(exc, (BotoCoreError, RetriesExceededError))
