"""Each loss against a small hand computation; IPOT against the exact transport solution."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from vlforge.train.losses import (
    ContrastiveLoss,
    hard_region_labels,
    ipot,
    itm_loss,
    itm_score,
    masked_select,
    mlm_loss,
    mrc_kl_loss,
    mrc_loss,
    mrfr_loss,
    optimal_transport_distance,
    wra_loss,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: OpenMP threads cost more than they give, and spin on a shared machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def nll(row: list[float], k: int) -> float:
    """−log softmax(row)[k], by hand."""
    return -(row[k] - math.log(sum(math.exp(x) for x in row)))


def test_mlm_loss_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 0.0], [0.5, 0.5, 3.0], [2.0, 1.0, 1.0]]])
    labels = torch.tensor([[1, -100, 0]])
    want = (nll([1.0, 2.0, 0.0], 1) + nll([2.0, 1.0, 1.0], 0)) / 2
    assert mlm_loss(logits, labels).item() == pytest.approx(want, rel=1e-6)
    h, lab = masked_select(logits, labels)
    assert h.shape == (2, 3) and lab.tolist() == [1, 0]


def test_mlm_loss_without_targets_is_zero_not_nan():
    logits = torch.randn(1, 2, 3, requires_grad=True)
    loss = mlm_loss(logits, torch.full((1, 2), -100))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


def test_hard_region_label_skips_background():
    prob = torch.tensor([[0.7, 0.1, 0.2], [0.1, 0.5, 0.4]])
    assert hard_region_labels(prob).tolist() == [2, 1]  # column ids, background (0) never


def test_mrc_loss_by_hand():
    logits = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0]])
    prob = torch.tensor([[0.7, 0.1, 0.2], [0.1, 0.5, 0.4]])
    want = (nll([0.0, 1.0, 2.0], 2) + nll([1.0, 0.0, 0.0], 1)) / 2
    assert mrc_loss(logits, prob).item() == pytest.approx(want, rel=1e-6)


def test_mrc_kl_loss_by_hand():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    p = [0.5, 0.5, 0.0]  # a zero entry contributes 0·log 0 = 0
    z = sum(math.exp(x) for x in (0.0, 1.0, 2.0))
    q = [math.exp(x) / z for x in (0.0, 1.0, 2.0)]
    want = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)
    assert mrc_kl_loss(logits, torch.tensor([p])).item() == pytest.approx(want, rel=1e-6)
    # KL of a distribution to itself is 0
    same = torch.log(torch.tensor([q]))
    assert mrc_kl_loss(same, torch.tensor([q])).item() == pytest.approx(0.0, abs=1e-6)


def test_mrfr_loss_by_hand():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    assert mrfr_loss(pred, target).item() == pytest.approx((1 + 0 + 1 + 1) / 4)
    empty = torch.zeros(0, 2, requires_grad=True)
    assert mrfr_loss(empty, empty.detach()).item() == 0.0


def test_itm_loss_and_score_by_hand():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    labels = torch.tensor([1, 0])
    want = (nll([0.0, 2.0], 1) + nll([1.0, -1.0], 0)) / 2
    assert itm_loss(logits, labels).item() == pytest.approx(want, rel=1e-6)
    assert itm_score(logits).tolist() == [2.0, -2.0]


def test_contrastive_loss_by_hand():
    loss_fn = ContrastiveLoss(init_temperature=0.5)
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # normalized inside: e1, e2
    txt = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # (0.6, 0.8), e2
    s = 2.0
    sim = [[0.6, 0.0], [0.8, 1.0]]  # sim[i][j] = img_i · txt_j
    i2t = (nll([s * 0.6, s * 0.0], 0) + nll([s * 0.8, s * 1.0], 1)) / 2
    t2i = (nll([s * sim[0][0], s * sim[1][0]], 0) + nll([s * sim[0][1], s * sim[1][1]], 1)) / 2
    assert loss_fn(img, txt).item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)


def test_contrastive_temperature_is_learned_and_clamped():
    loss_fn = ContrastiveLoss()
    assert loss_fn.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    img, txt = torch.randn(4, 8), torch.randn(4, 8)
    loss_fn(img, txt).backward()
    assert loss_fn.logit_scale.grad is not None and loss_fn.logit_scale.grad.abs() > 0
    with torch.no_grad():
        loss_fn.logit_scale.fill_(10.0)
    loss_fn.logit_scale.grad = None
    assert loss_fn.scale().item() == pytest.approx(100.0, rel=1e-5)
    loss_fn(img, txt).backward()
    assert loss_fn.logit_scale.grad.item() == 0.0  # held at the clamp


def _exact_ot(cost: np.ndarray) -> float:
    """Linear program: min ⟨C, T⟩ with row sums 1/m and column sums 1/n."""
    m, n = cost.shape
    rows = [np.kron(np.eye(m)[i], np.ones(n)) for i in range(m)]
    cols = [np.kron(np.ones(m), np.eye(n)[j]) for j in range(n)]
    res = linprog(
        cost.ravel(),
        A_eq=np.array(rows + cols),
        b_eq=[1 / m] * m + [1 / n] * n,
        bounds=(0, None),
    )
    return float(res.fun)


def test_ipot_matches_the_best_permutation():
    # Equal sizes and uniform marginals: the exact plan is a permutation (Birkhoff), so the
    # optimum is the best assignment's mean cost, found by enumerating all 4! of them.
    torch.manual_seed(0)
    cost = torch.rand(3, 4, 4) * 2
    plan = ipot(cost, torch.ones(3, 4), torch.ones(3, 4), iterations=1000)
    for c, t in zip(cost, plan, strict=True):
        best = min(
            sum(c[i, p[i]].item() for i in range(4)) / 4 for p in itertools.permutations(range(4))
        )
        assert (c * t).sum().item() == pytest.approx(best, abs=1e-5)
        torch.testing.assert_close(t.sum(1), torch.full((4,), 0.25))
        torch.testing.assert_close(t.sum(0), torch.full((4,), 0.25))


def test_ipot_matches_linear_program_with_padding():
    torch.manual_seed(1)
    x, y = torch.randn(1, 5, 6), torch.randn(1, 7, 6)
    x_mask = torch.tensor([[1, 1, 1, 0, 0]])  # 3 real tokens
    y_mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])  # 5 real regions
    dist = optimal_transport_distance(x, y, x_mask, y_mask, iterations=300)
    real = 1 - torch.nn.functional.cosine_similarity(x[0, :3, None], y[0, None, :5], dim=-1)
    assert dist.item() == pytest.approx(_exact_ot(real.numpy().astype(np.float64)), abs=1e-5)
    # The default 50 iterations (UNITER's) are already close.
    coarse = optimal_transport_distance(x, y, x_mask, y_mask)
    assert coarse.item() == pytest.approx(dist.item(), abs=1e-3)


def test_ot_distance_backpropagates_through_the_cost_only():
    x = torch.randn(2, 3, 4, requires_grad=True)
    y = torch.randn(2, 5, 4, requires_grad=True)
    d = optimal_transport_distance(x, y, torch.ones(2, 3), torch.ones(2, 5))
    d.sum().backward()
    assert x.grad is not None and y.grad is not None and torch.isfinite(x.grad).all()


def test_wra_loss_by_hand():
    d = torch.tensor([0.2, 0.9, 0.4])
    labels = torch.tensor([1, 0, 1])
    assert wra_loss(d, labels).item() == pytest.approx((0.2 - 0.9 + 0.4) / 3)


def _gather_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    img, txt = torch.randn(8, 6), torch.randn(8, 6)
    w = torch.randn(6, 6, requires_grad=True)  # a shared "model" every rank holds
    loss_fn = ContrastiveLoss()
    rows = slice(rank * 4, rank * 4 + 4)
    loss = loss_fn(img[rows] @ w, txt[rows])
    loss.backward()
    # DDP would average the gradients over ranks: do the same by hand.
    grads = torch.stack([w.grad, loss_fn.logit_scale.grad.expand(6, 6)])
    dist.all_reduce(grads)
    loss = loss.detach()
    dist.all_reduce(loss)
    if rank == 0:
        torch.save({"loss": loss / world, "grads": grads / world}, out)
    dist.destroy_process_group()


def test_contrastive_gathers_across_ranks_like_one_process(tmp_path):
    # Two gloo ranks with 4 pairs each give the loss and gradients of one process with all 8.
    import torch.multiprocessing as mp

    out = tmp_path / "rank0.pt"
    init = f"file://{tmp_path / 'store'}"
    mp.spawn(_gather_worker, args=(2, init, str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    torch.manual_seed(0)
    img, txt = torch.randn(8, 6), torch.randn(8, 6)
    w = torch.randn(6, 6, requires_grad=True)
    loss_fn = ContrastiveLoss()
    loss = loss_fn(img @ w, txt)
    loss.backward()
    torch.testing.assert_close(got["loss"], loss.detach())
    torch.testing.assert_close(got["grads"][0], w.grad)
    torch.testing.assert_close(got["grads"][1, 0, 0], loss_fn.logit_scale.grad)
