"""functions-framework entry of fl_secagg_client (Cloud Functions, Knative)."""
import functions_framework

from flcommon.entry import http_main
from fl_secagg_client import handle


@functions_framework.http
def fl_secagg_client(request):
    return http_main(handle, request)
