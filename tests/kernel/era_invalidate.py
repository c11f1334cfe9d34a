"""The blocks `era_invalidate` (thin-provisioning-tools) lists, as a set of block indexes."""

import functools
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path


@functools.cache  # the images do not change once the guest has run
def era_invalidate(metadata: Path, since: int, snapshot: bool) -> set[int]:
    """Run era_invalidate --written-since SINCE on METADATA; <block> and <range> both count."""
    argv = ["era_invalidate", "--written-since", str(since), str(metadata)]
    if snapshot:
        argv.insert(1, "--metadata-snapshot")
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout
    blocks: set[int] = set()
    for item in ET.fromstring(out):
        if item.tag == "block":
            blocks.add(int(item.attrib["block"]))
        else:
            blocks.update(range(int(item.attrib["begin"]), int(item.attrib["end"])))
    return blocks
