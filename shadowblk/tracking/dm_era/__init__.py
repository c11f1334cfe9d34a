"""dm-era metadata read on the host: the kernel's write tracking, as block indexes and extents."""

from shadowblk.tracking.dm_era.blocks import EraMetadataError
from shadowblk.tracking.dm_era.metadata import EraMetadata

__all__ = ["EraMetadata", "EraMetadataError"]
