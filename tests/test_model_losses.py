"""InfoNCE against explicit log-softmax arithmetic, and the gathered loss over 2 gloo processes."""

from __future__ import annotations

import datetime
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from comtip.model.losses import gather_with_grad, info_nce, siglip, value_contrast

IMG = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
TXT = torch.tensor([[1.0, 0.0], [0.6, 0.8]])


def _ce(logits: list[float], label: int) -> float:
    """-log softmax(logits)[label], written out."""
    return -logits[label] + math.log(sum(math.exp(z) for z in logits))


def test_info_nce_matches_hand_computation():
    # s = 2; logits image→text = 2·IMG·TXTᵀ = [[2, 1.2], [0, 1.6]]; text→image is its transpose
    i2t = (_ce([2.0, 1.2], 0) + _ce([0.0, 1.6], 1)) / 2
    t2i = (_ce([2.0, 0.0], 0) + _ce([1.2, 1.6], 1)) / 2
    expected = (i2t + t2i) / 2
    assert info_nce(IMG, TXT, 2.0).item() == pytest.approx(expected, rel=1e-6)


def test_info_nce_extra_negatives_only_on_image_to_text_and_masked():
    extra = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    mask = torch.tensor([True, False])  # the second extra negative is dropped
    # extra logits 2·IMG·extraᵀ = [[0, 2], [2, 0]]; only column 0 survives
    i2t = (_ce([2.0, 1.2, 0.0], 0) + _ce([0.0, 1.6, 2.0], 1)) / 2
    t2i = (_ce([2.0, 0.0], 0) + _ce([1.2, 1.6], 1)) / 2
    got = info_nce(IMG, TXT, torch.tensor(2.0), extra, mask)
    assert got.item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    # without the mask both extra columns count
    i2t_all = (_ce([2.0, 1.2, 0.0, 2.0], 0) + _ce([0.0, 1.6, 2.0, 0.0], 1)) / 2
    assert info_nce(IMG, TXT, 2.0, extra).item() == pytest.approx((i2t_all + t2i) / 2, rel=1e-6)


def _nls(z: float) -> float:
    """-log σ(z), written out."""
    return math.log(1.0 + math.exp(-z))


def test_siglip_matches_hand_computation():
    # s = 2, b = -1: logits 2·IMG·TXTᵀ - 1 = [[1, 0.2], [-1, 0.6]]; +1 on the diagonal, -1 off it
    expected = (_nls(1.0) + _nls(-0.2) + _nls(1.0) + _nls(0.6)) / 2
    assert siglip(IMG, TXT, 2.0, -1.0).item() == pytest.approx(expected, rel=1e-6)
    # extra negatives (label -1) with the mask: extra logits 2·IMG·extraᵀ - 1 = [[-1, 1], [1, -1]]
    extra, mask = torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([True, False])
    with_extra = expected + (_nls(1.0) + _nls(-1.0)) / 2  # only column 0 kept
    assert siglip(IMG, TXT, 2.0, -1.0, extra, mask).item() == pytest.approx(with_extra, rel=1e-6)
    # the bias is learnt: a gradient reaches it
    bias = torch.tensor(-1.0, requires_grad=True)
    siglip(IMG, TXT, torch.tensor(2.0), bias).backward()
    assert bias.grad is not None and bias.grad.abs() > 0


def test_value_contrast_matches_hand_computation():
    # img = I3, so img_i · txt_j = txt_j[i]: txt = Sᵀ gives the score matrix S; values 1, 1, 2:
    # rows 0 and 1 share value 1, so neither is the other's negative; row 2 sees every prompt.
    S = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [1.0, 1.0, 2.0]])
    values = torch.tensor([[1.0, 1.0, 2.0]])
    expected = (_ce([2.0, 0.0], 0) + _ce([1.0, 3.0], 0) + _ce([1.0, 1.0, 2.0], 2)) / 3
    got = value_contrast(torch.eye(3), S.T[None], values, 1.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # scale multiplies the scores
    doubled = (_ce([4.0, 0.0], 0) + _ce([2.0, 6.0], 0) + _ce([2.0, 2.0, 4.0], 2)) / 3
    assert value_contrast(torch.eye(3), S.T[None], values, 2.0).item() == pytest.approx(doubled, rel=1e-6)


def test_value_contrast_leaves_out_genes_without_a_second_value():
    S = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [1.0, 1.0, 2.0]])
    probes = torch.stack([S.T, S.T])
    values = torch.tensor([[1.0, 1.0, 2.0], [0.0, 0.0, 0.0]])  # the second gene: 0 everywhere
    only_first = value_contrast(torch.eye(3), S.T[None], values[:1], 1.0)
    assert value_contrast(torch.eye(3), probes, values, 1.0).item() == pytest.approx(only_first.item(), rel=1e-6)
    txt = S.T[None].clone().requires_grad_(True)
    none = value_contrast(torch.eye(3), txt, values[1:], 1.0)
    assert none.item() == 0.0
    none.backward()  # still part of the graph
    with pytest.raises(ValueError, match="do not match"):
        value_contrast(torch.eye(3), S.T, values, 1.0)


def test_gather_is_identity_without_distributed():
    x = torch.randn(3, 4)
    assert gather_with_grad(x) is x


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img, txt, extra = (torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1) for _ in range(3))
    mask = torch.tensor([True, False, True, True])
    return img, txt, extra, mask


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    out = Path(out_dir)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
        )
    except Exception as err:  # reported to the parent, which skips
        (out / f"init_failed_{rank}").write_text(repr(err))
        return
    img, txt, extra, mask = _batch()
    rows = slice(2 * rank, 2 * rank + 2)
    mine = [t[rows].clone().requires_grad_(True) for t in (img, txt, extra)]
    loss = info_nce(mine[0], mine[1], 3.0, mine[2], mask[rows])
    loss.backward()
    torch.save({"loss": loss.detach(), "grads": [t.grad for t in mine]}, out / f"rank{rank}.pt")
    mine = [t[rows].clone().requires_grad_(True) for t in (img, txt, extra)]
    loss = siglip(mine[0], mine[1], 3.0, -2.0, mine[2], mask[rows])
    loss.backward()
    torch.save({"loss": loss.detach(), "grads": [t.grad for t in mine]}, out / f"siglip{rank}.pt")
    dist.destroy_process_group()


def test_two_process_loss_equals_one_process_loss(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    failed = sorted(tmp_path.glob("init_failed_*"))
    if failed:
        pytest.skip(f"gloo could not start: {failed[0].read_text()}")
    img, txt, extra, mask = (t.clone() for t in _batch())
    full = [t.clone().requires_grad_(True) for t in (img, txt, extra)]
    full_loss = info_nce(full[0], full[1], 3.0, full[2], mask)
    full_loss.backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # the mean of the per-process losses is the loss of the whole batch
    assert ((ranks[0]["loss"] + ranks[1]["loss"]) / 2).item() == pytest.approx(full_loss.item(), rel=1e-5)
    # gradients cross processes (rank 0's images are negatives of rank 1's texts and vice versa):
    # each process gets d(sum of all processes' losses)/d(its rows) = W × the full-batch gradient
    for which in range(3):
        got = torch.cat([ranks[0]["grads"][which], ranks[1]["grads"][which]])
        torch.testing.assert_close(got / 2, full[which].grad, rtol=1e-5, atol=1e-6)
    # the same for the sigmoid loss
    full = [t.clone().requires_grad_(True) for t in (img, txt, extra)]
    full_loss = siglip(full[0], full[1], 3.0, -2.0, full[2], mask)
    full_loss.backward()
    ranks = [torch.load(tmp_path / f"siglip{r}.pt") for r in range(2)]
    assert ((ranks[0]["loss"] + ranks[1]["loss"]) / 2).item() == pytest.approx(full_loss.item(), rel=1e-5)
    for which in range(3):
        got = torch.cat([ranks[0]["grads"][which], ranks[1]["grads"][which]])
        torch.testing.assert_close(got / 2, full[which].grad, rtol=1e-5, atol=1e-6)


def test_losses_are_computed_in_fp32_under_bf16_autocast():
    """Under bf16 autocast the logits would keep 2-3 significant digits; the losses upcast and
    compute in float32, giving what they give outside autocast on the same embeddings."""
    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(32, 64, generator=g), dim=-1)
    txt = F.normalize(img + 0.3 * torch.randn(32, 64, generator=g), dim=-1)
    probe_txt = F.normalize(torch.randn(3, 32, 64, generator=g), dim=-1)
    probe_values = torch.randint(0, 4, (3, 32), generator=g).float()
    scale = torch.tensor(50.0)
    plain = (info_nce(img, txt, scale), value_contrast(img, probe_txt, probe_values, scale))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        assert (img @ txt.T).dtype == torch.bfloat16  # autocast is on for a matmul here
        mixed = (info_nce(img, txt, scale), value_contrast(img, probe_txt, probe_values, scale))
        from_bf16 = info_nce(img.bfloat16(), txt.bfloat16(), scale)
    for a, b in zip(plain, mixed, strict=True):
        assert b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert from_bf16.dtype == torch.float32
    torch.testing.assert_close(from_bf16, info_nce(img.bfloat16().float(), txt.bfloat16().float(), scale))
