"""functions-framework entry of fl_server_init (Cloud Functions, Knative)."""
import functions_framework

from flcommon.entry import http_main
from fl_server_init import handle


@functions_framework.http
def fl_server_init(request):
    return http_main(handle, request)
