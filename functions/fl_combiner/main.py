"""functions-framework entry of fl_combiner (Cloud Functions, Knative)."""
import functions_framework

from flcommon.entry import http_main
from fl_combiner import handle


@functions_framework.http
def fl_combiner(request):
    return http_main(handle, request)
