"""Self-supervised distillation objectives: SimReg's feature regression and SEED's similarity distributions.

Pure functions of tensors; the frozen teacher, the heads and SEED's queue live in `vdg.methods`. Both are computed
in float32 with autocast off: SEED's teacher temperature of 1e-4 turns bf16 rounding of a cosine into logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def simreg_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """SimReg (Navaneet et al., BMVC 2021): mean squared distance of the l2-normalised vectors.

    prediction [N, D] (the student's prediction head), target [N, D] (the frozen teacher's features). With
    p, t normalised: ||p - t||^2 = 2 - 2 cos(p, t); returns its batch mean (a 0-d tensor).
    """
    with torch.autocast(prediction.device.type, enabled=False):
        p = F.normalize(prediction.float(), dim=1)
        t = F.normalize(target.float(), dim=1)
        return (2 - 2 * (p * t).sum(dim=1)).mean()


def seed_loss(
    student: Tensor, teacher: Tensor, queue: Tensor, student_temperature: float, teacher_temperature: float
) -> Tensor:
    """SEED (Fang et al., ICLR 2021): cross-entropy between the teacher's and the student's similarity
    distributions over {the teacher's embedding of the same image} + a queue of past teacher embeddings.

    student [N, D], teacher [N, D]: embeddings (normalised here); queue [K, D]: normalised teacher embeddings.
        z_S = [s.t, s.q_1 .. s.q_K] / tau_S,   p_T = softmax([t.t, t.q_1 .. t.q_K] / tau_T)
        L = -(1/N) sum_i sum_j p_T[i, j] log softmax(z_S)[i, j]
    Returns the batch mean (a 0-d tensor); no gradient reaches `teacher` or `queue`.
    """
    with torch.autocast(student.device.type, enabled=False):
        s = F.normalize(student.float(), dim=1)
        t = F.normalize(teacher.detach().float(), dim=1)
        bank = queue.detach().float().clone()  # a copy: the caller updates the queue in place after the loss
        student_logits = torch.cat([(s * t).sum(dim=1, keepdim=True), s @ bank.T], dim=1) / student_temperature
        teacher_logits = torch.cat([(t * t).sum(dim=1, keepdim=True), t @ bank.T], dim=1) / teacher_temperature
        target = F.softmax(teacher_logits, dim=1)
        return -(target * F.log_softmax(student_logits, dim=1)).sum(dim=1).mean()
