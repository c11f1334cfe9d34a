"""The alerts configuration: webhook URLs and thresholds, from a small YAML file.

The file is named by the environment variable SHADOWBLK_ALERTS_CONFIG (a systemd unit's
`Environment=` line); without it the manager alerts to its log only, with default thresholds.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from shadowblk.manager.alerts.rules import Thresholds

ENV = "SHADOWBLK_ALERTS_CONFIG"


class ConfigError(ValueError):
    """The alerts file cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class AlertsConfig:
    webhooks: list[str] = field(default_factory=list)
    thresholds: Thresholds = field(default_factory=Thresholds)
    evaluate_every_s: float = 1.0


def parse(text: str, where: str = "alerts config") -> AlertsConfig:
    """AlertsConfig from YAML: `webhooks: [URL...]`, `thresholds: {lag_seconds: ...}`."""
    doc = yaml.safe_load(text) or {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected a mapping at the top")
    unknown = set(doc) - {"webhooks", "thresholds", "evaluate_every_s"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
    webhooks = doc.get("webhooks") or []
    if not all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in webhooks):
        raise ConfigError(f"{where}: webhooks must be a list of http(s) URLs")
    names = {f.name: f.type for f in dataclasses.fields(Thresholds)}
    given = doc.get("thresholds") or {}
    if not isinstance(given, dict) or set(given) - set(names):
        raise ConfigError(f"{where}: thresholds take only {sorted(names)}")
    for key, value in given.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{where}: thresholds.{key} must be a number >= 0")
    every = doc.get("evaluate_every_s", 1.0)
    if not isinstance(every, int | float) or not 0.1 <= every <= 60:
        raise ConfigError(f"{where}: evaluate_every_s must be from 0.1 to 60")
    return AlertsConfig(list(webhooks), Thresholds(**given), float(every))


def load() -> AlertsConfig:
    """The configuration named by $SHADOWBLK_ALERTS_CONFIG, or the defaults."""
    path = os.environ.get(ENV)
    if not path:
        return AlertsConfig()
    try:
        return parse(Path(path).read_text(), path)
    except OSError as err:
        raise ConfigError(f"{path}: {err.strerror}") from None
