"""The Gauss-Newton curvature of softmax cross-entropy per example (the class blocks both fits share) and the
blocking of the float64 work on N x N kernels."""

from __future__ import annotations

import torch

BLOCK_BYTES = 128 * 2**20  # float64 working blocks of the solve (bounded temporary memory)
# Rows per block of a symmetric kernel: the lower triangle is built block row by block row, so about half of the
# products of a full Gram matrix are skipped (at least this many block rows, fewer rows if memory asks).
TRIANGLE_BLOCKS = 16


def curvature_blocks(probs: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Per example, ``A = diag(p') + p' p'^T / p_top`` over the ``C - 1`` kept classes, float64 ``(N, C-1, C-1)``.

    With ``G'`` the kept classes' gradients, ``sum_c p_c g_c g_c^T = G'^T A G'`` because the predicted class's
    gradient is ``g_top = -(1 / p_top) sum_k p'_k g'_k``.
    """
    tiny = torch.finfo(torch.float64).tiny  # a probability that underflowed must not make A singular
    kept = probs.gather(1, classes).clamp_min(tiny)
    top = probs.max(1, keepdim=True).values  # >= 1 / C: dividing by it is safe
    return torch.diag_embed(kept) + kept[:, :, None] * kept[:, None, :] / top[:, :, None]


def curvature_roots(probs: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factors ``R`` of :func:`curvature_blocks` (``R R^T = A``), float64 ``(N, C-1, C-1)``: the
    curvature rows of an example are ``R^T G'``."""
    return torch.linalg.cholesky(curvature_blocks(probs, classes))


def kept_classes(probs: torch.Tensor) -> torch.Tensor:
    """The pseudo-labels whose gradients carry ``G``: every class but the predicted one, int64 ``(N, C-1)``."""
    n, c = probs.shape
    everything = torch.arange(c).expand(n, c)
    return everything[everything != probs.argmax(1, keepdim=True)].view(n, c - 1)


def label_coefficients(probs: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``b`` with ``g_{z,y} = b^T G'_z``: the label's own row, or ``-p' / p_top`` when the label is the predicted
    class (the one left out), float64 ``(N, C-1)``."""
    kept = probs.gather(1, classes)
    top = probs.max(1, keepdim=True).values
    own = (classes == labels[:, None]).double()
    return torch.where(own.sum(1, keepdim=True) > 0, own, -kept / top)


def mirror_lower(matrix: torch.Tensor, step: int) -> torch.Tensor:
    """Copy the blocks below the diagonal blocks (row blocks of ``step``) to the upper side, in place: the full
    symmetric matrix of a kernel built with ``lower=True``."""
    for start in range(step, matrix.shape[0], step):
        stop = min(start + step, matrix.shape[0])
        matrix[:start, start:stop] = matrix[start:stop, :start].T
    return matrix
