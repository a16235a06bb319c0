"""functions-framework entry of fl_insights (Cloud Functions, Knative)."""
import functions_framework

from flcommon.entry import http_main
from fl_insights import handle


@functions_framework.http
def fl_insights(request):
    return http_main(handle, request)
