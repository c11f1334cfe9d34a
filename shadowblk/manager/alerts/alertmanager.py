"""Notifications in the Alertmanager webhook format (version 4), so that any receiver written
for Alertmanager (chat bridges, pagers, ticket systems) takes the manager's alerts as they are.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

from shadowblk.manager.alerts.engine import Notification

RECEIVER = "shadowblk"
ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's endsAt of an alert still firing


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def labels_of(n: Notification) -> dict[str, str]:
    return {"alertname": n.alert.name, "severity": n.alert.severity, **dict(n.alert.labels)}


def fingerprint(labels: dict[str, str]) -> str:
    text = "\0".join(f"{k}\0{v}" for k, v in sorted(labels.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def alert_doc(n: Notification, external_url: str) -> dict[str, Any]:
    labels = labels_of(n)
    summary = n.alert.summary if n.ends_at is None else n.alert.resolved
    annotations = {"summary": summary}
    if n.alert.description:
        annotations["description"] = n.alert.description
    return {
        "status": n.status,
        "labels": labels,
        "annotations": annotations,
        "startsAt": rfc3339(n.starts_at),
        "endsAt": ZERO_TIME if n.ends_at is None else rfc3339(n.ends_at),
        "generatorURL": f"{external_url}/dashboard/",
        "fingerprint": fingerprint(labels),
    }


def payload(n: Notification, external_url: str) -> dict[str, Any]:
    """One webhook message for one notification (a group of one alert, grouped by all labels)."""
    labels = labels_of(n)
    doc = alert_doc(n, external_url)
    return {
        "version": "4",
        "groupKey": "{}:" + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}",
        "truncatedAlerts": 0,
        "status": n.status,
        "receiver": RECEIVER,
        "groupLabels": labels,
        "commonLabels": labels,
        "commonAnnotations": doc["annotations"],
        "externalURL": external_url,
        "alerts": [doc],
    }
