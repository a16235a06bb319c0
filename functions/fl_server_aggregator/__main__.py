"""OpenWhisk entry of fl_server_aggregator."""
from flcommon.entry import openwhisk_main
from fl_server_aggregator import handle


def main(args):
    return openwhisk_main(handle, args)
