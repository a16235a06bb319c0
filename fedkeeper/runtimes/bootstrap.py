"""Started as `python -I -S bootstrap.py SITE (SCRIPT | -m MODULE | -c CODE) ARGS...`.

Isolated mode without the site module leaves only the standard library on
sys.path. SITE, the directory holding exactly a runtime's distributions
(isolation.py), goes after it, as site-packages would; then SCRIPT (with its
own directory first, as Python puts it), MODULE or CODE runs as __main__. Imports
nothing but the standard library, and nothing of FedKeeper.
"""
import os
import runpy
import sys


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    site, rest = sys.argv[1], sys.argv[2:]
    sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != here] + [site]
    if not rest:
        sys.exit("usage: bootstrap.py SITE (SCRIPT | -m MODULE | -c CODE) [ARGS...]")
    if rest[0] == "-c":
        sys.argv = ["-c", *rest[2:]]
        sys.path.insert(0, "")
        exec(compile(rest[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    elif rest[0] == "-m":
        sys.argv = [rest[1], *rest[2:]]
        runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = rest
        sys.path.insert(0, os.path.dirname(os.path.abspath(rest[0])))
        runpy.run_path(rest[0], run_name="__main__")


if __name__ == "__main__":
    main()
