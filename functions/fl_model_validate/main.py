"""functions-framework entry of fl_model_validate (Cloud Functions, Knative)."""
import functions_framework

from flcommon.entry import http_main
from fl_model_validate import handle


@functions_framework.http
def fl_model_validate(request):
    return http_main(handle, request)
