"""uniter_fast.data: region features, texts, tokenizer, synthetic world, packing and batching."""
from uniter_fast.data.packing import PackedBatch, pack_batch

__all__ = ["PackedBatch", "pack_batch"]
