"""Google Cloud Functions (2nd gen): official v2 client for the control plane,
ID-token HTTPS calls through the shared HTTP invoker for invocations."""
from .errors import GOOGLE_STATUS_HEADER, google_status_hook, map_api_error
from .provider import CloudFunctionsProvider, function_id

__all__ = ["CloudFunctionsProvider", "GOOGLE_STATUS_HEADER", "function_id",
           "google_status_hook", "map_api_error"]
