"""Guest side of the live dm-era test, run in the host's userland inside the guest.

While the era target runs, the reader reads the metadata device once (so the guest's page cache
holds its blocks), more writes and a metadata snapshot follow (written by the kernel around that
cache), then the reader must see the new snapshot, not the cached past.
Usage: python -m tests.kernel.guest_era_live OUT META NAME BLOCK_BYTES
"""

import json
import subprocess
import sys
import time
from pathlib import Path

from shadowblk.tracking.dm_era import EraMetadata

TOOLS_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DM_DISABLE_UDEV": "1"}


def main(out: Path, meta: Path, name: str, block_bytes: int) -> None:
    def write(block: int) -> None:
        subprocess.run(["dd", "if=/dev/urandom", f"of=/dev/mapper/{name}", f"bs={block_bytes}",
                        f"seek={block}", "count=1", "oflag=direct", "status=none"],
                       check=True, env=TOOLS_ENV)  # fmt: skip

    def message(text: str) -> None:
        subprocess.run(["dmsetup", "message", name, "0", text], check=True, env=TOOLS_ENV)

    write(3)
    write(4)
    message("checkpoint")
    live = EraMetadata.open(meta, snapshot=False)
    write(60)
    message("take_metadata_snap")
    start = time.monotonic()
    snap = EraMetadata.open(meta, snapshot=True)
    seconds = time.monotonic() - start
    result = {
        "live_era": live.current_era,
        "live_since_1": list(live.written_since(1)),
        "snap_era": snap.current_era,
        "snap_since": {era: list(snap.written_since(era)) for era in (1, 2, 3)},
        "read_seconds": round(seconds, 3),
    }
    (out / "result.json").write_text(json.dumps(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
