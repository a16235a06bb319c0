"""The embedded local OpenWhisk fabric.

One process that speaks the subset of OpenWhisk's REST API FedKeeper uses,
with OpenWhisk's shapes, status codes and messages, and runs actions in warm
worker processes. The `openwhisk` provider talks to it exactly as it talks to
a real controller; Apache's own JavaScript client is run against it in the
conformance test.

Routes (all under basic auth `uuid:key`; `{ns}` is `_` or a namespace name):
  GET    /api/v1/namespaces                         list of namespaces
  GET    /api/v1/namespaces/{ns}/actions            list actions (?limit, ?skip)
  PUT    /api/v1/namespaces/{ns}/actions/{name}     create; 409 if it exists without ?overwrite=true
  GET    /api/v1/namespaces/{ns}/actions/{name}     404 when missing; ?code=false leaves the code out
  DELETE /api/v1/namespaces/{ns}/actions/{name}
  POST   /api/v1/namespaces/{ns}/actions/{name}     invoke: ?blocking, ?result, ?timeout (ms)
  GET    /api/v1/namespaces/{ns}/activations        ?name ?since ?upto ?limit(<=200) ?skip ?docs ?count
  GET    /api/v1/namespaces/{ns}/activations/{id}   404 until the activation has finished
  GET    /api/v1/namespaces/{ns}/activations/{id}/result | /logs
  GET    /api/v1/namespaces/{ns}/limits
Administration of the fabric itself (not part of OpenWhisk's API):
  GET|PUT /_fabric/faults?namespace=NS   fault injection: crash, timeout, throttle, slow_ms, seed, functions
  GET|PUT /_fabric/limits?namespace=NS   concurrentInvocations, invocationsPerMinute, payloadLimit, ...
  GET     /_fabric/status                workers, queues, counters, zygotes, and per action its
                                         limits.concurrency and the activations its workers run
  PUT     /_fabric/prewarm               {"runtimes": [...]}: start those runtimes' zygotes now,
                                         ahead of their actions' deploy
  GET     /metrics                       Prometheus metrics, without auth, under the names and
                                         labels of OpenWhisk's user-events service (see
                                         UserEvents below and docs/metrics.md)

Execution model (what a real invoker does, in processes instead of containers):
  * An action's code is a python zip (`exec.binary`) with `__main__.py`
    defining `main(args)` (or plain python source). It is unpacked once per
    action version, and its modules compiled then (checked-hash bytecode:
    workers may not write any, and each cold start would otherwise compile
    them again, most of a code load); a worker process (worker.py, same
    interpreter) loads it and then serves many activations: a warm start.
    A new worker is a cold start; its code load is the activation's
    `initTime`, the process start is part of its `waitTime`, as container
    creation is in OpenWhisk.
  * Per action, a pool of workers, each taking up to `limits.concurrency`
    activations at once. Workers are admitted against the fabric's user
    memory (`--user-memory-mb`, the sum of the actions' `limits.memory`, as
    an invoker's userMemory); when it is full an idle worker of another
    action is evicted for an action that has no worker (one that has grows
    into free memory only), else activations queue, never refused (and
    wait: `waitTime`). The default user memory is OpenWhisk's invoker default,
    2048 MB.
  * Stem cells (`--stem-cells RUNTIME=N,...`, default tensorflow=1), as
    OpenWhisk's prewarmed containers: worker processes of a runtime started
    ahead of need (once an action of that runtime is deployed) that have
    imported its heavy modules; a cold start takes one, so it is only the
    action's code load (a shorter `initTime`, annotation fk-start=prewarmed),
    and another is started when memory allows. They count against the user
    memory (`--stem-memory-mb` each until taken). Each is forked from its
    runtime's zygote (zygotes.py), one process per runtime that imports the
    modules once, so a stem cell starts in milliseconds and shares those
    pages (`--no-fork-stem-cells`: each imports them itself). A training
    command has the fabric start its runtimes' zygotes at its very beginning
    (fedkeeper/local/prewarm.py). The zygote is the fabric's own, like an
    invoker's image cache: not counted against the user memory.
  * `limits.timeout` is enforced by killing the worker; the activation gets
    OpenWhisk's "The action exceeded its time limits of N milliseconds." and
    the `timeout` annotation. `limits.memory` is enforced by watching the
    worker's anonymous memory (RssAnon + RssShmem) every 250 ms and killing
    it when it is exceeded ("The action exhausted its memory and was
    aborted."), as a container's memory limit counts what cannot be
    reclaimed: the pages of shared libraries are page cache, shared by all
    workers (TensorFlow's are 450 MB of each worker's RSS). An address space
    limit (RLIMIT_AS) is not used: TensorFlow reserves far more virtual
    memory than it ever touches.
  * Idle workers are reaped after `--idle-s` seconds (OpenWhisk keeps idle
    containers about ten minutes); redeploying an action retires its old
    workers (idle ones at once, busy ones when they finish).
  * Actions (metadata and code) are kept under the state directory and
    survive a restart of the fabric; activation records live in memory, the
    newest within a budget of bytes per namespace (`--record-mb`) and of
    count (`--max-records`), as the fabric is a stand-in for one machine.
  * Workers get only the environment OpenWhisk gives an action (its __OW_*
    variables) plus what a process needs (PATH, HOME, LANG, ...): nothing of
    the fabric's or the keeper's own.
Fault injection (faults.py, shared with the local Cloud Functions host) is
decided per invocation from a hash of (seed, namespace, action, sequence
number), so a seed gives the same faults for the same sequence of invocations
however they interleave in time:
  crash            the worker process dies under the activation (before main
                   runs): "action developer error", and the next activation
                   is a cold start
  timeout          the activation is held until the action's time limit, then
                   its worker is killed and it is recorded with OpenWhisk's
                   timeout status, as a real overrun is; annotation fk-fault=timeout
  timeout_instant  recorded at once as a time-limit overrun, without the wait
  throttle         the invoke request is answered 429
  slow_ms          added to every matching activation's run time

Modules: api (HTTP router), body (bounded request bodies), core
(namespaces, actions, admission, records), scheduler (queues and placement
on workers), workers + worker (the worker processes), watchdog (time,
memory and idle limits), records (activation records), metrics (/metrics),
admin (/_fabric), actions (definitions and code on disk), entities, status
(OpenWhisk's codes and messages), service (the fabric's process: serve, up,
down), __main__ (its command line).
"""
from __future__ import annotations

from .entities import DEFAULT_NAMESPACE, Settings
from .metrics import UserEvents
from .core import Fabric
from .service import (AUTH_FILE, LOG_FILE, STATE_FILE, fabric_down, fabric_release, fabric_status, fabric_up,
                      serve)
from .status import (MSG_ABNORMAL_RUN, MSG_MEMORY, MSG_NOT_FOUND, STATUS, ApiError, FabricError, msg_timeout)

__all__ = ["AUTH_FILE", "DEFAULT_NAMESPACE", "LOG_FILE", "MSG_ABNORMAL_RUN", "MSG_MEMORY", "MSG_NOT_FOUND",
           "STATE_FILE", "STATUS", "ApiError", "Fabric", "FabricError", "Settings", "UserEvents",
           "fabric_down", "fabric_release", "fabric_status", "fabric_up", "msg_timeout", "serve"]
