"""The whole config (`Config`), and how secrets are found and hidden."""
from __future__ import annotations

import re
from typing import Any, Optional, Union
from urllib.parse import quote_plus

from pydantic import BaseModel, Field, PrivateAttr, SecretStr

from .clusters import Providers, Strict
from .errors import ConfigError
from .scenario import Scenario
from .values import MIN_SECRET_LEN, PASSWORD_PLACEHOLDER, SessionName, url_credential

# Keys whose values are secrets wherever they appear.
SECRET_KEYS = {"ow_auth", "ow_apigw_access_token", "auth", "password", "private_key",
               "private_key_id", "token_secret", "client_secret"}


class Config(Strict):
    version: Optional[Union[str, float]] = None
    name: SessionName = "fedkeeper"   # prefix of every session id (file names, store keys)
    providers: Providers = Field(default_factory=Providers)
    scenarios: dict[str, Scenario] = Field(default_factory=dict)

    # set by load_config
    source: Optional[str] = Field(None, exclude=True)
    # set by load_config: key path -> (key, value as written) of each value
    # that came from ${ENV} or a <key>_file, so `config show` can print the
    # reference instead of the secret
    _sources: dict[tuple, tuple[str, str]] = PrivateAttr(default_factory=dict)

    def scenario(self, name: Optional[str] = None) -> tuple[str, Scenario]:
        if name:
            if name not in self.scenarios:
                raise ConfigError(f"no scenario named {name!r}; the config has "
                                  f"{sorted(self.scenarios) or 'none'}", file=self.source,
                                  path="scenarios")
            return name, self.scenarios[name]
        if "federated_learning" in self.scenarios:
            return "federated_learning", self.scenarios["federated_learning"]
        training = [n for n, s in self.scenarios.items() if s.clients_info is not None]
        if len(training) == 1:
            return training[0], self.scenarios[training[0]]
        raise ConfigError("name the scenario to run (-s NAME); candidates: "
                          f"{sorted(training) or 'none with clients_info'}", file=self.source,
                          path="scenarios")

    def secret_values(self) -> set[str]:
        """Every secret string in the config, for log redaction."""
        found: set[str] = set()

        def walk(o: Any):
            if isinstance(o, SecretStr):
                v = o.get_secret_value()
                if v and v != "embedded":
                    found.add(v)
                    found.add(quote_plus(v))  # as it appears in a URL it was put in (mongo_config)
                    if ":" in v:  # uuid:key -> the key alone too
                        found.add(v.split(":", 1)[1])
            elif isinstance(o, BaseModel):
                for k in type(o).model_fields:
                    walk(getattr(o, k))
                for v in (o.__pydantic_extra__ or {}).values():
                    walk(v)
            elif isinstance(o, dict):
                for k, v in o.items():
                    if k in SECRET_KEYS and isinstance(v, str) and v:
                        found.add(v)
                    walk(v)
            elif isinstance(o, list):
                for v in o:
                    walk(v)
            elif isinstance(o, str):
                credential = url_credential(o)
                if credential and credential != PASSWORD_PLACEHOLDER:
                    found.add(credential)

        walk(self)
        return {s for s in found if len(s) >= MIN_SECRET_LEN}

    def redacted(self) -> dict[str, Any]:
        return redact(self.model_dump(mode="python", by_alias=True, exclude_none=True))


def redact(o: Any) -> Any:
    if isinstance(o, SecretStr):
        return "***" if o.get_secret_value() not in ("", "embedded") else o.get_secret_value()
    if isinstance(o, dict):
        return {k: ("***" if k in SECRET_KEYS and isinstance(v, (str, SecretStr)) and v else redact(v))
                for k, v in o.items()}
    if isinstance(o, list):
        return [redact(v) for v in o]
    if isinstance(o, str) and "://" in o:
        return _without_userinfo(o)
    return o


def _without_userinfo(url: str) -> str:
    """`url` with its user info, if any, as *** and the rest as written:
    string work, so that a bad port or host in a section nothing checks
    (extra keys) cannot make it raise."""
    scheme, _, rest = url.partition("://")
    netloc, path = re.match(r"([^/?#]*)(.*)", rest, re.S).groups()
    userinfo, at, host = netloc.rpartition("@")
    return f"{scheme}://***@{host}{path}" if at else url
