"""UniterForPretraining: the trunk, the pre-training heads, and one task per forward (reference/uniter.md 1.8)."""
from __future__ import annotations

import torch
from torch import nn

from uniter_fast.config import UniterConfig
from uniter_fast.model.heads import MLMHead, RegionClassification, RegionFeatureRegression
from uniter_fast.model.uniter import UniterModel, init_weights
from uniter_fast.objectives.itm import itm_loss
from uniter_fast.objectives.mlm import mlm_loss
from uniter_fast.objectives.mrm import mrc_loss, mrfr_loss
from uniter_fast.objectives.tasks import PretrainBatch, TaskOutput
from uniter_fast.objectives.wra import wra_distances, wra_loss


class UniterForPretraining(nn.Module):
    """State-dict keys are the original's: uniter.*, cls.predictions.*, feat_regress.*, region_classifier.*,
    itm_output.* (cls.predictions.decoder.weight and feat_regress.weight are tied, and appear twice, as there).

    itm_ot_lambda: weight of the WRA loss added to ITM (0.1 in every original pre-training config; 0 turns it off).
    """

    def __init__(self, config: UniterConfig, *, itm_ot_lambda: float = 0.1, ot_beta: float = 0.5,
                 ot_iterations: int = 50):
        super().__init__()
        self.config = config
        self.uniter = UniterModel(config)
        self.cls = MLMHead(config, self.uniter.embeddings.word_embeddings)
        self.feat_regress = RegionFeatureRegression(config, self.uniter.img_embeddings.img_linear.weight)
        self.region_classifier = RegionClassification(config)
        self.itm_output = nn.Linear(config.hidden_size, 2)
        for head in (self.cls, self.feat_regress, self.region_classifier, self.itm_output):
            head.apply(lambda m: init_weights(m, config.initializer_range))
        self.itm_ot_lambda = itm_ot_lambda
        self.ot_beta = ot_beta
        self.ot_iterations = ot_iterations

    def forward(self, batch: PretrainBatch) -> TaskOutput:
        hidden = self.uniter(batch.inputs)
        task = batch.task
        if task == "mlm":
            loss, metrics = mlm_loss(self.cls(hidden.index_select(0, batch.mlm_rows)), batch.mlm_labels)
        elif task == "mrfr":
            loss, metrics = mrfr_loss(self.feat_regress(hidden.index_select(0, batch.mrm_rows)), batch.mrm_feat)
        elif task in ("mrc", "mrckl"):
            logits = self.region_classifier(hidden.index_select(0, batch.mrm_rows))
            loss, metrics = mrc_loss(logits, batch.mrm_soft_labels, kl=task == "mrckl")
        else:  # itm
            logits = self.itm_output(self.uniter.pool(hidden, batch.inputs))
            loss, metrics = itm_loss(logits, batch.itm_labels)
            if self.itm_ot_lambda > 0:
                distances = wra_distances(hidden, batch.inputs, beta=self.ot_beta, iterations=self.ot_iterations,
                                          backend=self.config.backend)
                ot_loss, ot_metrics = wra_loss(distances, batch.itm_labels)
                loss = loss + self.itm_ot_lambda * ot_loss
                metrics = {**metrics, **{f"ot_{k}": v for k, v in ot_metrics.items()}, "loss": loss.detach()}
        return TaskOutput(loss, metrics)

    def itm_scores(self, batch) -> torch.Tensor:
        """Matching score per pair (the logit of "matched"): what zero-shot retrieval ranks by, as the original's
        rank_output initialised from itm_output row 1."""
        hidden = self.uniter(batch)
        return self.itm_output(self.uniter.pool(hidden, batch))[:, 1]

    @classmethod
    def from_pretrained(cls, source, config: UniterConfig | None = None, *, strict: bool = True, **kwargs):
        """Load an original UNITER pre-training checkpoint (heads present or not) or a Hugging Face BERT checkpoint
        (text side and MLM head from BERT, image side fresh). Returns the model, or (model, LoadReport) with strict=False.
        """
        from uniter_fast.model.checkpoint import load_pretrained
        return load_pretrained(cls, source, config, strict=strict, **kwargs)
