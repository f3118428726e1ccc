"""The frozen-teacher base of the self-supervised distillation methods (SimReg, SEED: the paper's Table 3).

A `DistillMethod` is a trainable student, `BaseMethod`'s backbone (a dense ResNet-18, slim when
backbone.block_widths or student.channels_from shape it) with the method's heads, plus a frozen `Teacher`
(`vdg.methods.teachers`). It loads, resolves and guards the teacher; the objective is the subclass's `ssl_step`.

The teacher is deliberately *not* a submodule: its weights never reach the optimiser, DDP or the student's
checkpoints (a MoCo ResNet-50 would double every checkpoint), and Lightning's `.train()` on the module cannot
switch it to training mode. It still follows the module's device and dtype (`_apply`). Instead of the weights,
the config records the teacher (path, format, sha256, the teacher's output dimension) and every checkpoint
carries that record: resuming with a teacher file whose content differs is refused. Evaluating or exporting a
student never needs the teacher file.
"""

from __future__ import annotations

from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from vdg.core.errors import CheckpointError, TeacherError
from vdg.methods.base import BaseMethod
from vdg.methods.teachers import TEACHER_OUTPUTS, Teacher, load_teacher
from vdg.models import Branch

CHECKPOINT_KEY = "vdg_teacher"  # the teacher record in a student's checkpoint


class DistillMethod(BaseMethod):
    """Student (trainable) + teacher (frozen). Subclasses set `target_dim_key` (the method key whose value is the
    teacher output's dimension, resolved from the teacher when null) and build their heads after
    `super().__init__`; `teacher_output(x)` gives the targets.

    Config: teacher.* (pretrain.yaml: path, format, branch, pretrain_dataset, mean, std, sha256) and
    method.teacher_output ("features": the teacher's pooled backbone features; "embedding": after its head).
    """

    name = "distill"
    branches = (Branch.DENSE,)
    target_dim_key: ClassVar[str] = ""
    # what a user who has no teacher file yet needs to know (the paper's teacher of this method)
    teacher_hint: ClassVar[str] = (
        "teacher.path takes a vdg checkpoint or run directory, a backbone export, or a solo-learn, MoCo or "
        "torchvision ResNet file"
    )

    # ----- the config's record of the teacher -------------------------------------------------------------
    @classmethod
    def resolved(cls, cfg: DictConfig) -> bool:
        """Whether `cfg` already records its teacher (a saved run's config): then nothing reads the file."""
        t = cfg.teacher
        return bool(t.get("sha256")) and t.get("format") != "auto" and cfg.method.get(cls.target_dim_key) is not None

    @classmethod
    def configured_teacher(cls, cfg: DictConfig, resolve: bool) -> Teacher:
        """Load the teacher `cfg.teacher` names and check it against the config; with `resolve`, record in `cfg`
        its file, format, sha256, D_Pretrain, normalisation and output dimension (`target_dim_key`)."""
        t, m = cfg.teacher, cfg.method
        if t.get("path") is None:
            raise TeacherError(
                f"method={cls.name} distils a frozen teacher, but teacher.path is not set. {cls.teacher_hint}"
            )
        output = m.get("teacher_output")
        if output not in TEACHER_OUTPUTS:
            raise TeacherError(f"unknown method.teacher_output {output!r}; allowed values: {list(TEACHER_OUTPUTS)}")
        teacher = load_teacher(
            t.path, str(t.format), str(t.branch), t.get("mean"), t.get("std"), t.get("pretrain_dataset")
        )
        info = teacher.info
        if t.get("sha256") and t.sha256 != info.sha256:
            raise TeacherError(
                f"teacher.sha256={t.sha256} is recorded for this run, but teacher.path={t.path} now has sha256 "
                f"{info.sha256}: it is another file. Restore the original teacher, or start another run_dir"
            )
        dim = info.output_dim(str(output))
        configured = m.get(cls.target_dim_key)
        if configured is not None and int(configured) != dim:
            raise TeacherError(
                f"method.{cls.target_dim_key}={configured}, but the teacher's {output} have {dim} dimensions: "
                f"leave method.{cls.target_dim_key}=null to follow the teacher"
            )
        if resolve:
            t.path, t.format, t.sha256 = info.path, info.format, info.sha256
            t.pretrain_dataset = info.pretrain_dataset
            t.mean = None if info.mean is None else list(info.mean)
            t.std = None if info.std is None else list(info.std)
            m[cls.target_dim_key] = dim
        return teacher

    @classmethod
    def prepare_config(cls, cfg: DictConfig) -> None:
        cls.configured_teacher(cfg, resolve=True)

    # ----- module --------------------------------------------------------------------------------------------
    def __init__(self, cfg: DictConfig) -> None:
        # a fresh config (not a saved run's) learns the teacher's dimensions here; the teacher then is at hand
        teacher = None if self.resolved(cfg) else type(self).configured_teacher(cfg, resolve=True)
        super().__init__(cfg)
        object.__setattr__(self, "_teacher", None)  # bypasses nn.Module registration: see the module docstring
        if teacher is not None:
            self.attach_teacher(teacher)

    @property
    def teacher(self) -> Teacher:
        teacher = self.__dict__.get("_teacher")
        if teacher is None:
            raise TeacherError(f"{type(self).__name__} has no teacher yet: it is loaded when fitting starts (setup)")
        return teacher

    def attach_teacher(self, teacher: Teacher) -> None:
        """Use `teacher` (checked against the config's sha256), frozen, on this module's device and dtype."""
        expected = self.cfg.teacher.get("sha256")
        if expected and teacher.info.sha256 != expected:
            raise TeacherError(
                f"the teacher {teacher.info.path} has sha256 {teacher.info.sha256}, not teacher.sha256={expected}"
            )
        ds = self.cfg.dataset
        teacher.expect_inputs(list(ds.mean), list(ds.std))  # the student's training views are normalised so
        teacher.requires_grad_(False).eval()
        param = next(self.backbone.parameters())
        teacher.to(device=param.device, dtype=param.dtype)
        object.__setattr__(self, "_teacher", teacher)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.__dict__.get("_teacher") is None:
            self.attach_teacher(type(self).configured_teacher(self.cfg, resolve=False))

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> DistillMethod:
        super()._apply(fn, *args, **kwargs)
        teacher = self.__dict__.get("_teacher")
        if teacher is not None:  # .to(device), .half(), channels_last... reach the unregistered teacher too
            teacher._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True) -> DistillMethod:
        super().train(mode)
        teacher = self.__dict__.get("_teacher")
        if teacher is not None:
            teacher.eval()
        return self

    def teacher_output(self, x: Tensor) -> Tensor:
        """The frozen teacher's targets for images `x` (normalised as the student's views): no gradient."""
        return self.teacher(x, str(self.cfg.method.teacher_output)).detach()

    # ----- checkpoints ---------------------------------------------------------------------------------------
    def teacher_record(self) -> dict[str, Any]:
        teacher = self.__dict__.get("_teacher")
        if teacher is not None:
            return teacher.info.to_dict()
        return dict(OmegaConf.to_container(self.cfg.teacher, resolve=True))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.teacher_record()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        recorded = checkpoint.get(CHECKPOINT_KEY) or {}
        current = self.cfg.teacher.get("sha256")
        if recorded.get("sha256") and current and recorded["sha256"] != current:
            raise CheckpointError(
                f"refusing to resume: this checkpoint was distilled from {recorded.get('path')} (sha256 "
                f"{recorded['sha256']}), but teacher.path={self.cfg.teacher.path} has sha256 {current}"
            )
