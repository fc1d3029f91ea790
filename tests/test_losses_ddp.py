"""The batch-contrastive losses under DDP: with two gloo processes each holding half the batch, `gather_batch` must give
the loss of one process holding all of it, and each process's rows the gradient the full-batch loss gives them."""
import os, sys, socket
import torch, torch.nn.functional as F
import torch.distributed as dist
import torch.multiprocessing as mp
import pytest

from sidclip_guide.losses import gather_batch, clip_loss, contrastive_image_loss


def _free_port() -> int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def _batch():
    g = torch.Generator().manual_seed(0)
    return F.normalize(torch.randn(8, 5, generator=g), dim=-1), F.normalize(torch.randn(8, 5, generator=g), dim=-1)

def _worker(rank: int, port: int, out: str):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=2)
    a, b = _batch()
    res = {}
    for name, fn in {'clip': lambda x, y: clip_loss(x, y, 10.)['loss'], 'contrastive': lambda x, y: contrastive_image_loss(x, y, 0.1)['loss']}.items():
        mine = a[4 * rank: 4 * rank + 4].clone().requires_grad_()
        loss = fn(*gather_batch(mine, b[4 * rank: 4 * rank + 4]))
        loss.backward()
        res[name] = (loss.detach(), mine.grad)
    torch.save(res, f'{out}/rank{rank}.pt')
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason='torch.distributed is not available')
def test_gathered_losses_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = _batch()
    for name, fn in {'clip': lambda x, y: clip_loss(x, y, 10.)['loss'], 'contrastive': lambda x, y: contrastive_image_loss(x, y, 0.1)['loss']}.items():
        full = a.clone().requires_grad_(); loss = fn(full, b); loss.backward()
        for rank in (0, 1):
            l, g = torch.load(tmp_path / f'rank{rank}.pt')[name]
            assert torch.allclose(l, loss.detach(), atol=1e-5), (name, rank)                          # the full-batch loss on every process
            assert torch.allclose(g, full.grad[4 * rank: 4 * rank + 4], atol=1e-5), (name, rank)      # this process's rows get their gradient
    # and without the gather each process would see only 3 negatives: a different loss
    assert not torch.allclose(clip_loss(a[:4], b[:4], 10.)['loss'], clip_loss(a, b, 10.)['loss'])
