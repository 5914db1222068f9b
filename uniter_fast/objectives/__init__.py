"""Pre-training objectives: conditional masking, MLM, MRFR, MRC, MRC-kl, ITM and WRA (reference/uniter.md 1.8, 2, 3)."""
from uniter_fast.objectives.tasks import TASKS, PretrainBatch, TaskOutput

__all__ = ["TASKS", "PretrainBatch", "TaskOutput"]
