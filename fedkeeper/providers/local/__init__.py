"""Local stand-ins for the platforms, for one machine without a cloud account:
the embedded OpenWhisk fabric (`fabric`, `openwhisk`) and the local Cloud
Functions hosts. Nothing here is imported unless a local cluster is used."""
