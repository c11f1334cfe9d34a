"""The SMART model the prediction tests use: trained by the real `shadowblk predict train` on a
seeded 15% of the shared Backblaze drives (about 13,000 drives; 20-60 s of CPU)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd

from shadowblk.predict.sampling import held_out
from tests.procs import SHADOWBLK

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hds.csv.gz"
SAMPLE_SHARE = 0.15  # of the drives, chosen by a seeded hash of the serial
SAMPLE_SALT = "sample-7"
TRAIN_SEED = "3"


def write_sample(path: Path) -> Path:
    """Every row of the seeded sample of drives, as a start-stop CSV at PATH."""
    frame = pd.read_csv(DATA, dtype=str, keep_default_na=False)
    keep = held_out(frame["serial_number"].to_numpy(), SAMPLE_SHARE, SAMPLE_SALT)
    frame[keep].to_csv(path, index=False)
    return path


def train(sample: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`shadowblk predict train` on SAMPLE into OUT, seeded."""
    argv = [*SHADOWBLK, "predict", "train", "--data", str(sample), "--out", str(out)]
    return subprocess.run(
        [*argv, "--seed", TRAIN_SEED, *extra], capture_output=True, text=True, timeout=1200
    )
