"""functions-framework entry of fl_invoker (Cloud Functions, Knative)."""
import functions_framework

from flcommon.entry import http_main
from fl_invoker import handle


@functions_framework.http
def fl_invoker(request):
    return http_main(handle, request)
