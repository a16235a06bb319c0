"""OpenWhisk's activation status codes, the strings its API reports, and its
own messages (org.apache.openwhisk.http.Messages), as the fabric answers them."""
from __future__ import annotations

SUCCESS, APPLICATION_ERROR, DEVELOPER_ERROR, WHISK_ERROR = 0, 1, 2, 3
STATUS = {SUCCESS: "success", APPLICATION_ERROR: "application error",
          DEVELOPER_ERROR: "action developer error", WHISK_ERROR: "whisk internal error"}
# HTTP status of a blocking invoke that waited for its record.
BLOCKING_HTTP = {SUCCESS: 200, APPLICATION_ERROR: 502, DEVELOPER_ERROR: 502}

MSG_ABNORMAL_RUN = "The action did not produce a valid response and exited unexpectedly."
MSG_MEMORY = "The action exhausted its memory and was aborted."
MSG_NOT_FOUND = "The requested resource does not exist."
MSG_EXISTS = "resource already exists"
MSG_BAD_AUTH = "The supplied authentication is invalid."
MSG_PARAMS_NOT_ALLOWED = "Request defines parameters that are not allowed (e.g., reserved properties)."
MSG_REMOVED = "Action could not be found or may have been deleted."
MSG_SERVER_ERROR = "There was an error processing your request."


def msg_timeout(ms: int) -> str:
    return f"The action exceeded its time limits of {ms} milliseconds."


def msg_init_timeout(ms: int) -> str:
    return f"The action exceeded its time limits of {ms} milliseconds during initialization."


def msg_too_many_per_minute(count: int, allowed: int) -> str:
    return f"Too many requests in the last minute (count: {count}, allowed: {allowed})."


def msg_too_many_concurrent(count: int, allowed: int) -> str:
    return f"Too many concurrent requests in flight (count: {count}, allowed: {allowed})."


def msg_init_failed(detail: str) -> str:
    return f"The action failed during initialization: {detail}"


class ApiError(Exception):
    """An answer other than 2xx, with OpenWhisk's message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class FabricError(RuntimeError):
    """The fabric could not be started, reached or stopped."""


def msg_too_large(need_mb: int, user_memory_mb: int) -> str:
    """An activation no worker can take: its action's memory limit is above
    the invoker's user memory (lowered after the action was deployed)."""
    return (f"The action needs {need_mb} MB, more than the invoker's user memory ({user_memory_mb} MB): "
            "no container can run it.")
