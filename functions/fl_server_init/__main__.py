"""OpenWhisk entry of fl_server_init."""
from flcommon.entry import openwhisk_main
from fl_server_init import handle


def main(args):
    return openwhisk_main(handle, args)
