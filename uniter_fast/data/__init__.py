"""uniter_fast.data: region features, texts, tokenizer, synthetic world, packing and batching."""
from uniter_fast.data.packing import PackedBatch, pack_batch
from uniter_fast.data.region_store import (CorruptRecordError, RegionBatch, RegionStore, RegionStoreError,
                                           RegionStoreWriter, StoredRegions)

__all__ = ["PackedBatch", "pack_batch", "RegionStore", "RegionStoreWriter", "RegionBatch", "StoredRegions",
           "RegionStoreError", "CorruptRecordError"]
