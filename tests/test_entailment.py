"""DELST's entailment option (model.entailment): Lorentz geometry against closed forms, the cone
loss, training through CoMTIP, and that the option off leaves the model as it was."""

from __future__ import annotations

import math

import pytest
import torch

from comtip.model import CoMTIP, ModelConfig
from comtip.model.comtip import half_expressed_pad
from comtip.model.hyperbolic import (
    entailment_loss,
    exp_map0,
    exterior_angle,
    half_aperture,
    lorentz_inner,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GENES = [f"GENE{i}" for i in range(40)]


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(
        image_size=32,
        vision_kwargs={"depth": 2, "patch_size": 8, "embed_dim": 64, "num_heads": 2},
        embed_dim=32,
        mfm_heads=2,
        text_dim=32,
        text_heads=2,
        text_ff=64,
        name_buckets=1024,
        **kw,
    )


def _batch(rows: int = 8, length: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(40, generator=g)[:length] for _ in range(rows)])
    values = (torch.rand(rows, length, generator=g) * 3 + 0.1).sort(dim=1, descending=True).values
    pad = torch.zeros(rows, length, dtype=torch.bool)
    pad[1, 4:] = True
    return {
        "images": torch.randn(rows, 3, 32, 32, generator=g),
        "gene_ids": ids.masked_fill(pad, 0),
        "values": values.masked_fill(pad, 0.0),
        "bins": (values * 5).long().clamp(max=15).masked_fill(pad, 0),
        "pad": pad,
    }


@pytest.mark.parametrize("curv", [0.5, 1.0, 3.0])
def test_exp_map_lands_on_the_hyperboloid_and_is_the_identity_near_zero(curv):
    v = torch.randn(50, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = exp_map0(v, curv)
    torch.testing.assert_close(lorentz_inner(x, x, curv), torch.full((50,), -1.0 / curv, dtype=torch.float64))
    small = 1e-4 * v
    torch.testing.assert_close(exp_map0(small, curv), small, rtol=1e-6, atol=1e-12)
    # closed form along one axis: sinh(√c t) / √c
    t = torch.tensor([[0.7, 0.0]], dtype=torch.float64)
    assert exp_map0(t, curv)[0, 0].item() == pytest.approx(math.sinh(math.sqrt(curv) * 0.7) / math.sqrt(curv))


def test_half_aperture_matches_its_closed_form():
    x = torch.tensor([[0.4, 0.0], [3.0, 4.0], [0.05, 0.0]], dtype=torch.float64)
    aper = half_aperture(x, 1.0, min_radius=0.1)
    assert aper[0].item() == pytest.approx(math.asin(0.2 / 0.4), rel=1e-5)
    assert aper[1].item() == pytest.approx(math.asin(0.2 / 5.0), rel=1e-5)
    assert aper[2].item() == pytest.approx(math.pi / 2, abs=2e-3)  # clamped at 1: the widest cone
    assert half_aperture(x[:1], 4.0, 0.1).item() == pytest.approx(math.asin(0.2 / (2 * 0.4)), rel=1e-5)


def test_exterior_angle_on_a_line_through_the_origin_is_zero_or_pi():
    parent = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    farther = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    nearer = torch.tensor([[0.5, 0.0]], dtype=torch.float64)
    opposite = torch.tensor([[-1.0, 0.0]], dtype=torch.float64)
    assert exterior_angle(parent, farther, 1.0).item() == pytest.approx(0.0, abs=3e-3)
    assert exterior_angle(parent, nearer, 1.0).item() == pytest.approx(math.pi, abs=3e-3)
    assert exterior_angle(parent, opposite, 1.0).item() == pytest.approx(math.pi, abs=3e-3)


def test_exterior_angle_matches_the_hyperbolic_law_of_cosines():
    # in the Lorentz model (c = 1), the angle at x of the triangle (origin, x, y) is π - ext
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 1.0]], dtype=torch.float64)

    def dist(a, b):
        return torch.acosh(-lorentz_inner(a, b, 1.0)).item()

    o = torch.zeros(1, 2, dtype=torch.float64)
    a, b, c = dist(o, x), dist(x, y), dist(o, y)  # a: origin-x, b: x-y, c: opposite to the angle at x
    cos_x = (math.cosh(a) * math.cosh(b) - math.cosh(c)) / (math.sinh(a) * math.sinh(b))
    assert exterior_angle(x, y, 1.0).item() == pytest.approx(math.pi - math.acos(cos_x), abs=1e-5)


def test_entailment_loss_is_zero_inside_the_cone_and_positive_outside():
    parent = torch.tensor([[1.0, 0.0]])
    inside = torch.tensor([[3.0, 0.05]])
    outside = torch.tensor([[0.0, 3.0]])
    assert entailment_loss(parent, inside, 1.0).item() == 0.0
    assert entailment_loss(parent, outside, 1.0).item() > 0.5


def test_half_expressed_pad_keeps_a_random_half_of_the_expressed_genes():
    values = torch.tensor([[3.0, 2.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0], [0.0] * 5])
    pad = torch.tensor([[False, False, False, False, True], [False, True, True, True, True], [False] + [True] * 4])
    torch.manual_seed(0)
    cut = half_expressed_pad(values, pad)
    kept = ~cut
    assert kept[0].sum() == 1 and kept[0, :3].sum() == 1  # 3 expressed → 1 kept, an expressed one
    assert kept[1].tolist() == [True, False, False, False, False]  # at least one
    assert cut[2].tolist() == pad[2].tolist()  # nothing expressed: unchanged


def test_comtip_with_entailment_trains_the_cones_the_scales_and_the_curvature():
    torch.manual_seed(0)
    model = CoMTIP(_cfg(entailment=True, paat=False, mfm=False), GENES)
    batch = _batch()
    out = model(batch)
    cfg = model.cfg
    expected = out["loss_infonce"] + cfg.entailment_lambda * out["loss_entail_cross"]
    expected = expected + cfg.entailment_beta * out["loss_entail_intra"]
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()
    for p in (model.entail_log_alpha_img, model.entail_log_alpha_txt, model.entail_log_curv):
        assert p.grad is not None and p.grad.abs() > 0
    assert model.entail_log_alpha_img.item() == pytest.approx(math.log(1 / math.sqrt(32)))

    def terms() -> float:
        torch.manual_seed(1)  # the same intra-modal cut each time
        model.eval()
        with torch.no_grad():
            o = model(batch)
        model.train()
        return (o["loss_entail_cross"] + o["loss_entail_intra"]).item()

    before = terms()
    assert before > 0
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        opt.zero_grad()
        o = model(batch)
        (o["loss_entail_cross"] + o["loss_entail_intra"]).backward()
        opt.step()
    assert terms() < before


def test_entailment_off_leaves_parameters_and_loss_as_before():
    batch = _batch()
    torch.manual_seed(0)
    plain = CoMTIP(_cfg(), GENES)
    torch.manual_seed(0)
    off = CoMTIP(ModelConfig.from_dict({**_cfg().to_dict(), "entailment": False}), GENES)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in off.named_parameters()]
    for a, b in zip(plain.parameters(), off.parameters(), strict=True):
        assert torch.equal(a, b)
    torch.manual_seed(5)
    loss_plain = plain(batch)["loss"]
    rng_plain = torch.rand(1)
    torch.manual_seed(5)
    loss_off = off(batch)["loss"]
    assert torch.equal(loss_plain, loss_off)
    assert torch.equal(rng_plain, torch.rand(1))  # no extra draws


def test_entailment_config_round_trips_and_is_checked():
    cfg = _cfg(entailment=True, entailment_curvature=2.0)
    back = ModelConfig.architecture(cfg.to_dict())
    assert back == cfg
    model = CoMTIP(back, GENES)
    state = CoMTIP(cfg, GENES).state_dict()
    model.load_state_dict(state)
    assert model.curvature().item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="entailment_curvature"):
        ModelConfig(entailment_curvature=20.0)
    with pytest.raises(ValueError, match="entailment_lambda"):
        ModelConfig(entailment_lambda=-1.0)
