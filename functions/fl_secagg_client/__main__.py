"""OpenWhisk entry of fl_secagg_client."""
from flcommon.entry import openwhisk_main
from fl_secagg_client import handle


def main(args):
    return openwhisk_main(handle, args)
