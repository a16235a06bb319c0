"""OpenWhisk entry of fl_insights."""
from flcommon.entry import openwhisk_main
from fl_insights import handle


def main(args):
    return openwhisk_main(handle, args)
