#!/usr/bin/env python3
"""FedKeeper-compatible deploy entry point (same flags as the original tool).

    python deploy.py -c config.yaml -a -s test -f nodeinfo -d
    python deploy.py -c config.yaml -o ow_cluster -g gcf_cluster -s test -f nodeinfo -r

It runs the same code as `fedkeeper deploy` / `fedkeeper remove`.
"""
import argparse
import sys


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deploy.py", description="Deploy or remove functions on FaaS clusters.")
    p.add_argument("-c", "--configfile", required=True, help="config file path")
    p.add_argument("-a", "--all_providers", action="store_true", help="all clusters of all providers")
    p.add_argument("-o", "--ow_providers_list", type=_csv, default=[],
                   help="OpenWhisk clusters, separated by commas")
    p.add_argument("-g", "--gcf_providers_list", type=_csv, default=[],
                   help="Google Cloud Functions clusters, separated by commas")
    p.add_argument("-s", "--scenario_name", required=True, help="scenario name (e.g. test)")
    p.add_argument("-f", "--functions_list", type=_csv, required=True, help="functions, separated by commas")
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("-d", "--deploy", action="store_true", help="deploy")
    action.add_argument("-r", "--remove", action="store_true", help="remove")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from fedkeeper.cli import UsageFailure, load, run_deploy, select_clusters
    try:
        cfg = load(args.configfile)
        if not (args.all_providers or args.ow_providers_list or args.gcf_providers_list):
            raise UsageFailure("name clusters with -a, -o or -g")
        clusters = select_clusters(cfg, all_clusters=args.all_providers,
                                   sections={"openwhisk": args.ow_providers_list,
                                             "google": args.gcf_providers_list})
        return run_deploy(cfg, args.scenario_name, args.functions_list, clusters, remove=args.remove)
    except UsageFailure as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside a session (a session says how to resume itself)
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
