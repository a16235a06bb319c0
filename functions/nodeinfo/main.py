"""functions-framework entry of nodeinfo (Cloud Functions, Knative)."""
import functions_framework

from flcommon.entry import http_main
from nodeinfo import handle


@functions_framework.http
def nodeinfo(request):
    return http_main(handle, request)
