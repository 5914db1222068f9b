"""UNITER model: embeddings, encoder and trunk over packed batches, pre-training heads, checkpoint loading."""
from uniter_fast.model.checkpoint import CheckpointError, LoadReport, save_checkpoint, to_bert_state_dict
from uniter_fast.model.pretrain import UniterForPretraining
from uniter_fast.model.uniter import UniterModel

__all__ = ["UniterModel", "UniterForPretraining", "CheckpointError", "LoadReport", "save_checkpoint",
           "to_bert_state_dict"]
