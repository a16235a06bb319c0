"""OpenWhisk entry of fl_client."""
from flcommon.entry import openwhisk_main
from fl_client import handle


def main(args):
    return openwhisk_main(handle, args)
