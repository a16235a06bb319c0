#!/usr/bin/env python3
"""FedKeeper-compatible training entry point (same flags as the original tool).

    python main.py -c config.yaml -r   remove the training functions
    python main.py -c config.yaml -d   deploy them
    python main.py -c config.yaml -s   start federated learning

It runs the same code as `fedkeeper remove`, `fedkeeper deploy` and
`fedkeeper start` on the `federated_learning` scenario.
"""
import argparse
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="main.py", description="Federated learning over FaaS clusters.")
    p.add_argument("-c", "--configfile", required=True, help="config file path")
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("-d", "--deploy", action="store_true", help="deploy the FL functions")
    action.add_argument("-r", "--remove", action="store_true", help="remove the FL functions")
    action.add_argument("-s", "--start_fl", action="store_true", help="start federated learning")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from fedkeeper.cli import UsageFailure, load, run_deploy, run_start
    try:
        cfg = load(args.configfile)
        if args.start_fl:
            return run_start(cfg, None)
        return run_deploy(cfg, None, None, None, remove=args.remove)
    except UsageFailure as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside a session (a session says how to resume itself)
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
