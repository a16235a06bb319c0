"""OpenWhisk entry of fl_invoker."""
from flcommon.entry import openwhisk_main
from fl_invoker import handle


def main(args):
    return openwhisk_main(handle, args)
