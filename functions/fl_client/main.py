"""functions-framework entry of fl_client (Cloud Functions, Knative)."""
import functions_framework

from flcommon.entry import http_main
from fl_client import handle


@functions_framework.http
def fl_client(request):
    return http_main(handle, request)
