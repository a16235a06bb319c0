"""FedKeeper: federated learning over serverless platforms."""

__version__ = "0.1.0"
