"""The stored predictor: features, trees, calibration and fleet rates in one versioned JSON file.

JSON, not pickle: loading never runs code, and the format is ours to version. A file with
another ``format_version`` is refused with a clear error rather than scored wrongly.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shadowblk.predict.calibration import Platt
from shadowblk.predict.drives import DriveTable
from shadowblk.predict.features import FleetRates, History, feature_names
from shadowblk.predict.sampling import HORIZON_DAYS
from shadowblk.predict.trees import TreeEnsemble

FORMAT = "shadowblk-smart-model"
FORMAT_VERSION = 1


class ModelFileError(ValueError):
    """The file is not a predictor model this version of shadowblk can use."""


@dataclass(frozen=True)
class Model:
    """Everything needed to turn a drive's SMART history into P(fail within 30 days)."""

    trees: TreeEnsemble
    calibration: Platt
    rates: FleetRates
    features: list[str]
    info: dict[str, Any]  # how it was trained: seed, data, split, counts

    def history(self, table: DriveTable) -> History:
        return History(table, self.rates)

    def margin(self, x: np.ndarray) -> np.ndarray:
        return self.trees.margin(x)

    def probability(self, x: np.ndarray) -> np.ndarray:
        return self.calibration(self.trees.margin(x))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "horizon_days": HORIZON_DAYS,
            "features": self.features,
            "trees": self.trees.to_json(),
            "calibration": self.calibration.to_json(),
            "rates": self.rates.to_json(),
            "info": self.info,
        }

    def save(self, path: Path) -> None:
        """Write the model (gzip-compressed when PATH ends in .gz)."""
        data = json.dumps(self.to_json(), separators=(",", ":")).encode()
        if path.suffix == ".gz":
            data = gzip.compress(data, mtime=0)
        path.write_bytes(data)

    @classmethod
    def from_json(cls, doc: Any) -> Model:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ModelFileError(f"not a shadowblk SMART model (expected format {FORMAT!r})")
        version = doc.get("format_version")
        if version != FORMAT_VERSION:
            raise ModelFileError(
                f"model format_version {version!r} is not supported "
                f"(this shadowblk reads version {FORMAT_VERSION}); retrain with "
                "`shadowblk predict train`"
            )
        features = list(doc.get("features", []))
        if features != feature_names():
            raise ModelFileError("the model's feature list differs from this shadowblk's")
        try:
            return cls(
                trees=TreeEnsemble.from_json(doc["trees"], len(features)),
                calibration=Platt.from_json(doc["calibration"]),
                rates=FleetRates.from_json(doc["rates"]),
                features=features,
                info=dict(doc.get("info", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"damaged model file: {exc}") from exc

    @classmethod
    def load(cls, path: Path) -> Model:
        try:
            data = path.read_bytes()
            if data[:2] == b"\x1f\x8b":
                data = gzip.decompress(data)
            doc = json.loads(data)
        except FileNotFoundError as exc:
            raise ModelFileError(f"{path}: no such model file") from exc
        except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelFileError(f"{path}: not a JSON model file: {exc}") from exc
        try:
            return cls.from_json(doc)
        except ModelFileError as exc:
            raise ModelFileError(f"{path}: {exc}") from exc
