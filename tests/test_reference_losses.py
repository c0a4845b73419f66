"""Our losses against an independent implementation: lightly (the maintained third-party SSL library).

``tests/reference/losses.npz`` holds fixed random embeddings and lightly's values and gradients on
them, computed in float64 by ``tests/reference/make_loss_reference.py`` (run in the reference venv;
its docstring has the command). Our losses run in float32 on the same float32 inputs; a value must
agree to a relative 1e-5 and a gradient to a relative 1e-5 in norm (‖g − g_ref‖ ≤ 1e-5·‖g_ref‖).

Where lightly's conventions differ from the papers', the mapping is explicit below:
- NT-Xent, VICReg, Barlow Twins, SwAV, Sinkhorn-Knopp: the same formula and parameters for two views
  (lightly's VICRegLoss, like the official code, averages the two variance terms and adds the two
  covariance terms; its parts are compared with ours one by one).
- BYOL: lightly has no BYOL loss; the fixture maps its NegativeCosineSimilarity (mean −cos) to the
  paper's normalised MSE, ‖p̄ − z̄‖² = 2 + 2·NCS, summed over the two directions (L + L̃).
- EMP-SSL: lightly's ``tcr_loss`` (mean over patches of ½ logdet(I + d/(Bε) ZᵀZ)) and its invariance
  term are compared with ours; its ``EMPSSLLoss`` adds +TCR, while the paper and the official code
  minimise λ·invariance − TCR, which is how our loss combines the two parts.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from onepoch.losses import (
    barlow_twins_loss,
    byol_loss,
    emp_ssl_loss,
    nt_xent_loss,
    patch_invariance,
    sinkhorn_knopp,
    swav_loss,
    total_coding_rate,
    vicreg_loss,
)
from onepoch.methods.swav import SwAV, SwAVConfig

FIXTURE = Path(__file__).parent / "reference" / "losses.npz"
RTOL = 1e-5


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


def tensor(a: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32)).requires_grad_(grad)


def assert_close(ours: torch.Tensor, reference: np.ndarray, what: str) -> None:
    """Relative agreement: |a − b| <= RTOL·|b| for a scalar, ‖a − b‖ <= RTOL·‖b‖ for an array."""
    a = ours.detach().double().numpy()
    b = np.asarray(reference, dtype=np.float64)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    error, scale = np.linalg.norm(a - b), np.linalg.norm(b)
    assert scale > 0, what
    assert error <= RTOL * scale, (f"{what}: relative error {error / scale:.2e} "
                                   f"(ours {a.ravel()[:3]}, lightly {b.ravel()[:3]})")


def check(loss: torch.Tensor, inputs: list[torch.Tensor], ref_value, ref_grads: list, what: str) -> None:
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, ref_value, f"{what} value")
    for x, g, ref_g in zip(inputs, torch.autograd.grad(loss, inputs), ref_grads):
        assert_close(g, ref_g, f"{what} gradient")


@pytest.mark.parametrize("case", ["ntxent_t02", "ntxent_t05"])
def test_nt_xent_matches_lightly(ref, case):
    z = tensor(ref[f"{case}.z"], grad=True)
    tau = float(ref[f"{case}.temperature"])
    check(nt_xent_loss(z, tau), [z], ref[f"{case}.value"], [ref[f"{case}.grad"]], case)


@pytest.mark.parametrize("case", ["vicreg_default", "vicreg_weights"])
def test_vicreg_matches_lightly_and_the_official_weighting(ref, case):
    z = tensor(ref[f"{case}.z"], grad=True)
    lam, mu, nu = (float(w) for w in ref[f"{case}.weights"])
    loss, parts = vicreg_loss(z, sim_weight=lam, var_weight=mu, cov_weight=nu)
    check(loss, [z], ref[f"{case}.value"], [ref[f"{case}.grad"]], case)
    for key in ("invariance", "variance", "covariance"):
        assert_close(parts[key], ref[f"{case}.part_{key}"], f"{case} part {key}")


@pytest.mark.parametrize("case", ["barlow_default", "barlow_lambda"])
def test_barlow_twins_matches_lightly(ref, case):
    z = tensor(ref[f"{case}.z"], grad=True)
    lam = float(ref[f"{case}.lambda_offdiag"])
    check(barlow_twins_loss(z, lam), [z], ref[f"{case}.value"], [ref[f"{case}.grad"]], case)


def test_byol_matches_lightly_mapped_to_the_papers_sum_of_directions(ref):
    p = tensor(ref["byol.p"], grad=True)
    target = tensor(ref["byol.target"], grad=True)
    loss = byol_loss(p, target)
    check(loss, [p], ref["byol.value"], [ref["byol.grad"]], "byol")
    assert torch.autograd.grad(loss, target, allow_unused=True)[0] is None  # the target is detached


@pytest.mark.parametrize("case,code_views", [("swav_multicrop", 2), ("swav_two_views", 2)])
def test_swav_with_sinkhorn_matches_lightly(ref, case, code_views):
    scores = tensor(ref[f"{case}.scores"], grad=True)
    codes = torch.stack([sinkhorn_knopp(scores[i], epsilon=0.05, iterations=3) for i in range(code_views)])
    check(swav_loss(scores, codes, temperature=0.1), [scores], ref[f"{case}.value"], [ref[f"{case}.grad"]], case)


class _NoBackbone(torch.nn.Module):
    feature_dim = 16


def test_swav_queue_codes_of_the_method_match_lightly(ref):
    """The method's own code path: the queue (embeddings of earlier steps) scored against the current
    prototypes joins the batch in Sinkhorn-Knopp once full, and only the batch's codes are kept."""
    scores = tensor(ref["swav_queue.scores"], grad=True)
    queue = tensor(ref["swav_queue.queue"])
    model = SwAV(_NoBackbone(), SwAVConfig(projector="16", prototypes=10, queue_size=queue.shape[1]))
    with torch.no_grad():
        model.prototypes.weight.copy_(tensor(ref["swav_queue.prototypes"]))
        model.queue.copy_(queue)
        model.queue_count.fill_(queue.shape[1])
    codes = torch.stack([model._codes(i, scores[i].detach()) for i in range(2)])
    check(swav_loss(scores, codes, temperature=0.1), [scores], ref["swav_queue.value"], [ref["swav_queue.grad"]],
          "swav_queue")


@pytest.mark.parametrize("iterations", [1, 3, 7])
def test_sinkhorn_knopp_matches_lightly(ref, iterations):
    scores = tensor(ref[f"sinkhorn_{iterations}.scores"])
    assert_close(sinkhorn_knopp(scores, epsilon=0.05, iterations=iterations), ref[f"sinkhorn_{iterations}.codes"],
                 f"sinkhorn {iterations} iterations")


def test_emp_ssl_parts_match_lightly_and_combine_as_the_official_code(ref):
    z = tensor(ref["emp_ssl.z"], grad=True)
    eps = float(ref["emp_ssl.eps"])
    check(total_coding_rate(z, eps).mean(), [z], ref["emp_ssl.tcr"], [ref["emp_ssl.tcr_grad"]], "TCR")
    check(patch_invariance(z), [z], ref["emp_ssl.invariance"], [ref["emp_ssl.invariance_grad"]], "invariance")
    weight = 200.0
    combined_value = weight * ref["emp_ssl.invariance"] - ref["emp_ssl.tcr"]
    combined_grad = weight * ref["emp_ssl.invariance_grad"] - ref["emp_ssl.tcr_grad"]
    loss, parts = emp_ssl_loss(z, eps=eps, invariance_weight=weight)
    check(loss, [z], combined_value, [combined_grad], "EMP-SSL")
    assert_close(parts["tcr"], ref["emp_ssl.tcr"], "EMP-SSL part tcr")
    assert_close(parts["invariance"], ref["emp_ssl.invariance"], "EMP-SSL part invariance")


def test_emp_ssl_invariance_flows_through_the_mean_patch_as_lightly(ref):
    """On embeddings that are not unit vectors (for unit vectors the gradient through the mean vanishes)."""
    z = tensor(ref["emp_ssl_raw.z"], grad=True)
    check(patch_invariance(z), [z], ref["emp_ssl_raw.invariance"], [ref["emp_ssl_raw.invariance_grad"]],
          "invariance (not unit vectors)")
