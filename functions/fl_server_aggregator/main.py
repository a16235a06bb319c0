"""functions-framework entry of fl_server_aggregator (Cloud Functions, Knative)."""
import functions_framework

from flcommon.entry import http_main
from fl_server_aggregator import handle


@functions_framework.http
def fl_server_aggregator(request):
    return http_main(handle, request)
