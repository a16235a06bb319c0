"""OpenWhisk entry of fl_model_validate."""
from flcommon.entry import openwhisk_main
from fl_model_validate import handle


def main(args):
    return openwhisk_main(handle, args)
