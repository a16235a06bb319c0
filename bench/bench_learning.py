"""Rounds to a target accuracy: FedKeeper against a plain FedAvg reference.

The reference is sequential FedAvg written with Keras alone: the same data
split and partition (flcommon.data), the same architecture and initial
weights (flcommon.models.build with the session's seed), the same
optimizer and learning rate; every client in every round gets a freshly
compiled Keras model with a new optimizer, `model.fit` for the local
epochs, and the server takes the example-weighted mean of the weights.
FedKeeper then runs the same task as a real session on the local clusters
(`fedkeeper start` in a fresh state directory), and both round counts are
printed side by side.

    .venv/bin/python bench/bench_learning.py                # the baseline task
    .venv/bin/python bench/bench_learning.py --smoke        # a tiny run (tests)

Baseline task (a common FL baseline): digits, 10 IID clients, all sampled
each round, Adam lr 3e-3, batch 10, 1 local epoch, target 0.93.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "functions"))
# This tree's fedkeeper in the commands it starts: the `fedkeeper` script
# alone would import the checkout the .venv was installed from.
TREE_ENV = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def reference_rounds(args) -> tuple[int | None, list[float]]:
    """Sequential Keras FedAvg; returns (first round reaching the target or
    None, accuracy after each round)."""
    import keras
    import numpy as np

    from flcommon.data import load_digits_split, partition
    from flcommon.models import build

    x_tr, y_tr, x_te, y_te = load_digits_split()
    parts = partition(y_tr, args.clients, "iid", args.seed)
    global_w = build("small", x_tr.shape[1:], 10, seed=args.seed).get_weights()
    curve: list[float] = []
    hit = None
    for rnd in range(1, args.max_rounds + 1):
        updates = []
        for i, idx in enumerate(parts):
            model = build("small", x_tr.shape[1:], 10, seed=args.seed * 1000 + rnd * 100 + i)
            model.compile(optimizer=keras.optimizers.Adam(learning_rate=args.lr),
                          loss="sparse_categorical_crossentropy", metrics=["accuracy"])
            model.set_weights(global_w)
            model.fit(x_tr[idx], y_tr[idx], epochs=args.epochs, batch_size=args.batch,
                      shuffle=True, verbose=0)
            updates.append((model.get_weights(), len(idx)))
        total = sum(n for _, n in updates)
        global_w = [sum(w[k].astype(np.float64) * n for w, n in updates) / total
                    for k in range(len(global_w))]
        global_w = [w.astype(np.float32) for w in global_w]
        model = build("small", x_tr.shape[1:], 10)
        model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        model.set_weights(global_w)
        acc = float(model.evaluate(x_te, y_te, verbose=0)[1])
        curve.append(acc)
        print(f"  reference round {rnd}: accuracy {acc:.4f}", flush=True)
        if hit is None and acc >= args.target:
            hit = rnd
            break
    return hit, curve


CONFIG = """\
version: 0.1
name: learning_bench
providers:
  openwhisk:
    local_ow: {{kind: local}}
  google:
    local_gcf: {{kind: local}}
scenarios:
  federated_learning:
    server_config:
      server_cluster_name: local_ow
      server_manager_functions: [fl_server_init, fl_server_aggregator]
    clients_info:
      total_num_clients: {clients}
      num_clients_per_round: {clients}
      edge_clients_count: 0
      ow_clients_count: {ow}
      gcf_clients_count: {gcf}
      client_functions: [fl_client]
    data_sampling:
      input_shape_x: 8
      input_shape_y: 8
      output_size: 10
      batch_size: {batch}
      model: small
      partition: iid
    mongo_config: {{url: embedded, db: fedkeeper}}
    training_test_data: {{dataset: digits}}
    model_params: {{lr: "{lr}", optim: adam, local_epochs: "{epochs}"}}
    training:
      rounds: {max_rounds}
      target_accuracy: {target}
      seed: {seed}
      quorum: 1.0
    functions:
      fl_client:
        openwhisk: {{memory: "1024", timeout: "120000"}}
        google: {{memory: 1024MB, timeout: 120s}}
      fl_server_init:
        openwhisk: {{memory: "1024", timeout: "120000"}}
      fl_server_aggregator:
        openwhisk: {{memory: "1024", timeout: "120000"}}
"""


def fedkeeper_rounds(args) -> tuple[int | None, list[float]]:
    """The same task as a FedKeeper session on the local clusters."""
    exe = str(Path(sys.executable).with_name("fedkeeper"))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "learning.yaml"
        cfg.write_text(CONFIG.format(clients=args.clients, ow=args.clients // 2,
                                     gcf=args.clients - args.clients // 2, batch=args.batch,
                                     lr=args.lr, epochs=args.epochs, max_rounds=args.max_rounds,
                                     target=args.target, seed=args.seed))
        env = dict(os.environ, **TREE_ENV, FEDKEEPER_STATE_DIR=str(Path(tmp) / "state"),
                   FEDKEEPER_LOG_DIR=str(Path(tmp) / "logs"))
        subprocess.run([exe, "start", "-c", str(cfg)], env=env, check=True,
                       stdout=subprocess.DEVNULL, timeout=args.timeout_s)
        out = subprocess.run([exe, "status", "-c", str(cfg), "--json"], env=env, check=True,
                             capture_output=True, text=True, timeout=120).stdout
        subprocess.run([exe, "fabric", "down", "-c", str(cfg)], env=env, check=False,
                       capture_output=True, timeout=120)
    rounds = json.loads(out)["rounds"]
    curve = [float(r.get("accuracy") or 0.0) for r in rounds]
    hit = next((i + 1 for i, acc in enumerate(curve) if acc >= args.target), None)
    return hit, curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--target", type=float, default=0.93)
    ap.add_argument("--max-rounds", type=int, default=40)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--timeout-s", type=float, default=1800)
    ap.add_argument("--skip-fedkeeper", action="store_true", help="run the reference only")
    ap.add_argument("--smoke", action="store_true", help="a tiny run: 2 clients, 2 rounds")
    args = ap.parse_args()
    if args.smoke:
        args.clients, args.max_rounds, args.target = 2, 2, 0.5
    t0 = time.time()
    ref_hit, ref_curve = reference_rounds(args)
    ref_s = time.time() - t0
    rows = [("Keras FedAvg reference", ref_hit, ref_curve, ref_s)]
    if not args.skip_fedkeeper:
        t0 = time.time()
        fk_hit, fk_curve = fedkeeper_rounds(args)
        rows.append(("FedKeeper session", fk_hit, fk_curve, time.time() - t0))
    print()
    print(f"rounds to {args.target} ({args.clients} IID clients, all sampled, adam lr {args.lr}, "
          f"batch {args.batch}, {args.epochs} local epoch(s), seed {args.seed})")
    print(f"{'run':<24} {'rounds':>7} {'final acc':>10} {'wall s':>8}")
    for name, hit, curve, secs in rows:
        shown = str(hit) if hit is not None else f">{len(curve)}"
        print(f"{name:<24} {shown:>7} {curve[-1] if curve else float('nan'):>10.4f} {secs:>8.1f}")


if __name__ == "__main__":
    main()
