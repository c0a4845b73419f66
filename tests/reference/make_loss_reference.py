"""Write ``tests/reference/losses.npz``: lightly's SSL losses and their gradients on fixed random
embeddings, the independent reference that ``tests/test_reference_losses.py`` compares
``onepoch.losses`` with.

Run it in the reference environment (torch 2.14.1, torchvision 0.29.1, lightly 1.6.0; lightly needs
torchvision, which does not import beside the project's CPU torch), from the repository root:

    /work/refvenv/bin/python tests/reference/make_loss_reference.py

For each case the fixture holds the inputs (float32, as the tests pass them to our losses), and
lightly's value and gradients with respect to the inputs, computed in float64 from exactly those
float32 numbers. This script does not import onepoch: the fixture holds lightly's numbers only.
Keys are ``<case>.<name>``; ``meta.versions`` records the library versions.
"""

from __future__ import annotations

from pathlib import Path

import lightly
import numpy as np
import torch
import torch.nn.functional as F
from lightly.loss import BarlowTwinsLoss, NegativeCosineSimilarity, NTXentLoss, SwaVLoss, VICRegLoss
from lightly.loss.emp_ssl_loss import invariance_loss as emp_invariance
from lightly.loss.emp_ssl_loss import tcr_loss
from lightly.loss.swav_loss import sinkhorn
from lightly.loss.vicreg_loss import covariance_loss, invariance_loss, variance_loss

OUT = Path(__file__).with_name("losses.npz")


def draw(seed: int, *shape: int) -> torch.Tensor:
    """Standard normal float32 numbers from a seeded generator."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def value_and_grads(fn, *inputs: torch.Tensor) -> tuple[np.ndarray, list[np.ndarray]]:
    """fn(*inputs) in float64 and its gradient w.r.t. every input (inputs given as float32)."""
    x64 = [t.double().requires_grad_(True) for t in inputs]
    out = fn(*x64).reshape(())  # lightly's SwaVLoss returns shape (1,)
    grads = torch.autograd.grad(out, x64)
    return out.detach().numpy(), [g.numpy() for g in grads]


def main() -> None:
    torch.use_deterministic_algorithms(True)
    fixture: dict[str, np.ndarray] = {
        "meta.versions": np.array(f"torch {torch.__version__}, lightly {lightly.__version__}"),
    }

    def put(case: str, **arrays) -> None:
        for name, a in arrays.items():
            fixture[f"{case}.{name}"] = np.asarray(a.detach().numpy() if torch.is_tensor(a) else a)

    # NT-Xent: lightly's (out0, out1) are our views 0 and 1; both average over the 2B anchors.
    for case, tau, seed in (("ntxent_t02", 0.2, 1), ("ntxent_t05", 0.5, 2)):
        z = draw(seed, 2, 16, 32)
        value, (grad,) = value_and_grads(lambda t: NTXentLoss(temperature=tau)(t[0], t[1]), z)
        put(case, z=z, temperature=np.float64(tau), value=value, grad=grad)

    # VICReg: columns of two scales (std about 0.5 and 2, so the hinge is active on half of them,
    # away from its kink) and a shared component (so the covariance term is not near 0).
    for case, weights, seed in (("vicreg_default", (25.0, 25.0, 1.0), 3), ("vicreg_weights", (10.0, 5.0, 3.0), 4)):
        scale = torch.tensor([0.5, 2.0]).repeat_interleave(12)
        z = draw(seed, 2, 32, 24) * scale + 0.4 * draw(seed + 100, 2, 32, 1)
        lam, mu, nu = weights
        value, (grad,) = value_and_grads(
            lambda t: VICRegLoss(lambda_param=lam, mu_param=mu, nu_param=nu)(t[0], t[1]), z)
        zd = z.double()
        parts = dict(invariance=invariance_loss(zd[0], zd[1]),
                     variance=0.5 * (variance_loss(zd[0]) + variance_loss(zd[1])),
                     covariance=covariance_loss(zd[0]) + covariance_loss(zd[1]))
        put(case, z=z, weights=np.array(weights), value=value, grad=grad,
            **{f"part_{k}": v for k, v in parts.items()})

    # Barlow Twins: lightly standardises with F.batch_norm (biased variance, eps 1e-5) as we do.
    for case, lam, seed in (("barlow_default", 5e-3, 5), ("barlow_lambda", 0.05, 6)):
        z = draw(seed, 2, 32, 12) * 1.5 + 0.3
        value, (grad,) = value_and_grads(lambda t: BarlowTwinsLoss(lambda_param=lam)(t[0], t[1]), z)
        put(case, z=z, lambda_offdiag=np.float64(lam), value=value, grad=grad)

    # BYOL: lightly has no BYOL loss class; its BYOL example uses NegativeCosineSimilarity (NCS, the mean
    # of -cos). Mapped to the paper's normalised MSE: ||p/|p| - z/|z|||^2 = 2 - 2 cos = 2 + 2 NCS, summed
    # over the two directions (the paper's L + L~). The gradient is taken w.r.t. the predictions only.
    p, target = draw(7, 2, 16, 32), draw(8, 2, 16, 32)
    ncs = NegativeCosineSimilarity(dim=-1)
    value, (grad,) = value_and_grads(
        lambda q: (2 + 2 * ncs(q[0], target[1].double())) + (2 + 2 * ncs(q[1], target[0].double())), p)
    put("byol", p=p, target=target, value=value, grad=grad)

    # SwAV: scores of L2-normalised embeddings against L2-normalised prototypes (cosines, as in SwAV).
    # Multi-crop: 2 high-resolution views (the code views) and 4 low-resolution ones; lightly's defaults
    # temperature 0.1, 3 Sinkhorn iterations, epsilon 0.05.
    prototypes = F.normalize(draw(9, 10, 16), dim=1)
    z = F.normalize(draw(10, 6, 32, 16), dim=-1)
    scores = (z @ prototypes.T).float()  # [6, 32, 10]
    loss = SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)
    value, (grad,) = value_and_grads(lambda s: loss(list(s[:2]), list(s[2:])), scores)
    put("swav_multicrop", scores=scores, value=value, grad=grad)
    value, (grad,) = value_and_grads(lambda s: loss(list(s), []), scores[:2])
    put("swav_two_views", scores=scores[:2], value=value, grad=grad)
    # With a queue of 64 earlier embeddings per code view (scored against the same prototypes).
    queue = F.normalize(draw(11, 2, 64, 16), dim=-1)
    queue_scores = (queue.double() @ prototypes.double().T)
    value, (grad,) = value_and_grads(lambda s: loss(list(s[:2]), list(s[2:]), list(queue_scores)), scores)
    put("swav_queue", scores=scores, prototypes=prototypes, queue=queue, value=value, grad=grad)
    for iterations in (1, 3, 7):
        put(f"sinkhorn_{iterations}", scores=scores[0],
            codes=sinkhorn(scores[0].double(), iterations=iterations, epsilon=0.05))

    # EMP-SSL: lightly's parts, tcr_loss = (1/n) sum_i 1/2 logdet(I + d/(B eps) Z_i^T Z_i) (eps as the
    # official code) and the invariance -mean cos(z, mean_i z). (lightly's EMPSSLLoss returns
    # tcr_loss + inv_coef * invariance, which *minimises* the coding rate; the official code's loss is
    # inv_coef * invariance - R, so the test composes the parts with that sign.)
    z = F.normalize(draw(12, 4, 16, 32), dim=-1)
    tcr_value, (tcr_grad,) = value_and_grads(lambda t: tcr_loss(t, eps=0.2), z)
    inv_value, (inv_grad,) = value_and_grads(emp_invariance, z)
    put("emp_ssl", z=z, eps=np.float64(0.2), tcr=tcr_value, tcr_grad=tcr_grad, invariance=inv_value,
        invariance_grad=inv_grad)
    # The invariance on embeddings that are not unit vectors: for unit vectors the gradient through the
    # (undetached) mean patch vanishes, so only such inputs show that the mean is not detached.
    z = draw(13, 4, 16, 32) * torch.linspace(0.5, 2.0, 16).view(1, 16, 1)
    inv_value, (inv_grad,) = value_and_grads(emp_invariance, z)
    put("emp_ssl_raw", z=z, invariance=inv_value, invariance_grad=inv_grad)

    np.savez_compressed(OUT, **fixture)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(fixture)} arrays)")


if __name__ == "__main__":
    main()
