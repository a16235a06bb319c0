"""OpenWhisk entry of fl_combiner."""
from flcommon.entry import openwhisk_main
from fl_combiner import handle


def main(args):
    return openwhisk_main(handle, args)
