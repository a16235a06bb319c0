"""Apache OpenWhisk provider: the REST API of a controller, remote or the
embedded local fabric."""
from .provider import OpenWhiskProvider

__all__ = ["OpenWhiskProvider"]
