"""Run by `fedkeeper config validate` in a child process, so that importing
the user's module (and TensorFlow) neither slows nor endangers the keeper:
imports the module, checks its signatures, builds its model for the
declared shapes and checks the output size; calls `partition` on
synthetic labels when the module defines it.

Input: one JSON object on stdin; output: one JSON line on stdout,
{"ok": true, "input_shape": [...], "num_classes": C, "params": N, "defines": [...]}
or {"ok": false, "stage": ..., "message": ...}. Imports nothing of fedkeeper.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _shapes(module, code, declared: dict[str, Any]) -> tuple[tuple[int, ...], int, str]:
    shape, classes = getattr(module, "INPUT_SHAPE", None), getattr(module, "NUM_CLASSES", None)
    if shape is not None and classes is not None:
        return tuple(int(d) for d in shape), int(classes), "declared by the module"
    if declared.get("input_shape") and declared.get("num_classes"):
        return tuple(declared["input_shape"]), int(declared["num_classes"]), "declared by the config"
    x_tr, y_tr, _, y_te = code.load_data()
    return tuple(int(d) for d in x_tr.shape[1:]), int(max(y_tr.max(), y_te.max()) + 1), "from load_data"


def probe(request: dict[str, Any]) -> dict[str, Any]:
    from flcommon.entry import BadRequest
    from flcommon.user_code import INTERFACE, BuiltinCode, ModuleCode, load_module, signature_problems
    import inspect
    path = Path(request["path"])
    stage = "import"
    try:
        module = load_module(path)
        stage = "signature"
        problems = signature_problems(module)
        for name, kwargs, positional in (("build_model", request.get("model_params") or {}, 2),
                                         ("load_data", request.get("data_params") or {}, 0)):
            fn = getattr(module, name, None)
            if callable(fn) and kwargs:
                try:
                    inspect.signature(fn).bind(*range(positional), **kwargs)
                except TypeError as exc:
                    problems.append(f"{name} does not take the configured {sorted(kwargs)}: {exc}")
                except ValueError:
                    pass
        if problems:
            return {"ok": False, "stage": stage, "message": f"{path.name}: " + "; ".join(problems)}
        code = ModuleCode(module, path, BuiltinCode(request.get("spec") or {}), request.get("model_params") or {},
                          request.get("data_params") or {}, "probe")
        stage = "shapes"
        shape, classes, origin = _shapes(module, code, request)
        stage = "build_model"
        model = code.build_model(shape, classes)
        if callable(getattr(module, "partition", None)):
            stage = "partition"
            n = max(2, int(request.get("clients") or 2))
            code.partition(np.arange(max(100, 10 * n)) % classes, n, 0)
    except BadRequest as exc:  # UserCodeError included: the user's code failed
        return {"ok": False, "stage": stage, "message": str(exc)}
    return {"ok": True, "input_shape": list(shape), "num_classes": classes, "shapes": origin,
            "params": int(model.count_params()), "defines": [n for n in INTERFACE if hasattr(module, n)]}


def main() -> None:
    request = json.loads(sys.stdin.read())
    out = probe(request)
    sys.stdout.write("\n" + json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
