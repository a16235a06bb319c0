"""OpenWhisk entry of nodeinfo."""
from flcommon.entry import openwhisk_main
from nodeinfo import handle


def main(args):
    return openwhisk_main(handle, args)
