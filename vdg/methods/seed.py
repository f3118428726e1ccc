"""SEED (Fang et al., "SEED: Self-supervised Distillation for Visual Representation", ICLR 2021): the student
matches the teacher's similarity distribution over a queue of past teacher embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vdg.core.errors import ConfigError
from vdg.losses.distill import seed_loss
from vdg.losses.distributed import gather_rows
from vdg.methods.base import StepOutput
from vdg.methods.distill import DistillMethod
from vdg.models import Branch


class EmbeddingQueue(nn.Module):
    """A FIFO of the last `size` teacher embeddings [size, dim] (buffers: saved in checkpoints, moved with the
    module). Starts as random unit vectors, as SEED's (and MoCo's) queue does.

    push(keys [N, dim]) writes rows pointer, pointer + 1, ... (mod size) and advances the pointer by N, with
    device-side index arithmetic only (no host read per step). N > size keeps the newest `size` keys.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1:
            raise ConfigError(f"method.queue_size={size} must be >= 1")
        self.size = size
        self.register_buffer("embeddings", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, keys: Tensor) -> None:
        n = keys.shape[0]
        kept = keys[-self.size :] if n > self.size else keys
        start = self.pointer + (n - kept.shape[0])  # the dropped oldest keys still advance the pointer
        rows = (start + torch.arange(kept.shape[0], device=keys.device)) % self.size
        self.embeddings.index_copy_(0, rows, kept.detach().to(self.embeddings.dtype))
        self.pointer.copy_((self.pointer + n) % self.size)


class SEED(DistillMethod):
    """L = CE(softmax(z_T / tau_T), softmax(z_S / tau_S)) over [the image's own teacher embedding, the queue],
    `seed_loss`; then the batch's teacher embeddings (all processes') enter the queue.

    One view per image (view 0; the recipe's MoCo-v2 augmentation, configs/recipe/seed.yaml) goes to both
    networks. The student's head is SEED's MLP (Linear d->d, ReLU, Linear d->D), D the teacher embedding's
    dimension (128 for MoCo-v2, whose own MLP head gives the teacher embedding).

    Config (method/seed.yaml): projector_hidden_dim (null: d), projector_output_dim (null: the teacher's,
    resolved at start), queue_size K (65536), student_temperature tau_S (0.2), teacher_temperature tau_T (1e-4),
    teacher_output (embedding: after the teacher's head, SEED's default; features: pooled backbone features,
    for teacher files without a head). Defaults from the SEED paper and its authors' released settings
    (queue 65,536, tau_S 0.2, tau_T 1e-4, SGD lr 0.03 x batch/256, weight decay 1e-4, cosine, 200 epochs).
    """

    name = "seed"
    target_dim_key = "projector_output_dim"
    teacher_hint = (
        "The paper's SEED teacher is the MoCo authors' MoCo-v2 ResNet-50 (800 epochs on ImageNet-1K): download "
        "moco_v2_800ep_pretrain.pth.tar from the model table of https://github.com/facebookresearch/moco (vdg "
        "never downloads it), then pass teacher.path=/path/to/moco_v2_800ep_pretrain.pth.tar, or, for "
        "+sweep=table3, moco_v2_r50=/path/to/moco_v2_800ep_pretrain.pth.tar"
    )

    def __init__(self, cfg) -> None:  # noqa: ANN001 - DictConfig
        super().__init__(cfg)
        m, d = cfg.method, self.backbone.feature_dim
        dim = int(m.projector_output_dim)
        hidden = int(m.projector_hidden_dim or d)
        self.projector = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))
        self.queue = EmbeddingQueue(int(m.queue_size), dim)

    def ssl_step(self, views: list[Tensor], targets: Tensor) -> StepOutput:
        m = self.cfg.method
        x = views[0]
        features = self.encode(x, Branch.DENSE).features
        teacher = F.normalize(self.teacher_output(x).float(), dim=1)
        loss = seed_loss(
            self.projector(features),
            teacher,
            self.queue.embeddings,
            float(m.student_temperature),
            float(m.teacher_temperature),
        )
        self.queue.push(gather_rows(teacher))  # after the loss: the batch is not its own negative
        return StepOutput(loss, {"seed_loss": loss}, {Branch.DENSE: features})
