"""The reference path on CUDA: same results as on the CPU, and bf16 training steps that stay finite."""
import pytest
import torch

from uniter_fast.data.packing import pack_batch
from uniter_fast.kernels import ot
from uniter_fast.model import UniterForPretraining, UniterModel
from uniter_fast.objectives.tasks import PretrainBatch
from helpers import random_samples, tiny_config

pytestmark = pytest.mark.gpu


def test_trunk_on_cuda_matches_cpu():
    model = UniterModel(tiny_config()).eval()
    texts, regions = random_samples(8, seed=11)
    batch = pack_batch(texts, regions)
    with torch.no_grad():
        expected = model(batch)
        got = model.cuda()(batch.to("cuda")).cpu()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_ipot_on_cuda_matches_cpu():
    cost = torch.rand(64, 20, 30) * 2
    text_lens, region_lens = torch.randint(1, 21, (64,)), torch.randint(1, 31, (64,))
    dist, plan = ot.ipot(cost, text_lens, region_lens, return_plan=True)
    dist_gpu, plan_gpu = ot.ipot(cost.cuda(), text_lens.cuda(), region_lens.cuda(), return_plan=True)
    torch.testing.assert_close(dist_gpu.cpu(), dist, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(plan_gpu.cpu(), plan, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pretraining_step_in_low_precision_is_finite(dtype):
    config = tiny_config()
    model = UniterForPretraining(config).cuda()
    texts, regions = random_samples(8, seed=12, allow_empty_regions=False)
    batch = PretrainBatch("itm", pack_batch(texts, regions), itm_labels=torch.randint(0, 2, (8,))).to("cuda")
    with torch.autocast("cuda", dtype=dtype):
        out = model(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
