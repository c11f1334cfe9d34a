"""dm-era metadata images written by a real kernel, kept small (xz) in tests/unit/data/dm_era.

They are the metadata devices of the two era parts of tests/kernel (lab_run.SMALL and
lab_run.BIG) after one guest boot, compressed with `xz -9`; docs/dm-era.md says how to remake them.
"""

import lzma
from pathlib import Path

from tests.kernel.lab_run import BIG, SMALL, EraCase

DATA = Path(__file__).parent / "data" / "dm_era"
IMAGES = {"small": SMALL, "big": BIG}


def unpack(name: str, dest: Path) -> tuple[Path, EraCase]:
    """The image NAME ('small' or 'big') as a file under DEST, and the operations that made it."""
    path = dest / f"{name}-meta.img"
    path.write_bytes(lzma.decompress((DATA / f"{name}-meta.img.xz").read_bytes()))
    return path, IMAGES[name]
