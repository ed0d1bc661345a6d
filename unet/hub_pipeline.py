"""
The pipeline that ``python -m unet.export`` writes beside a class-conditional model as
``pipeline.py``. It imports only ``torch`` and ``diffusers``, so a user without this package
generates by class label with stock libraries:

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("exported/digits", custom_pipeline="exported/digits")
    images = pipe(class_labels=[0, 1, 2, 3], guidance_scale=2.0, num_inference_steps=100).images

Classifier-free guidance (Ho & Salimans 2022): for a model trained with label dropout, whose
last class embedding is the "no label" class, the mean channels of the output become
``uncond + w * (cond - uncond)``; learned-variance channels are taken from the conditional
pass, as improved-DDPM's sampler needs the model's own variance. ``w = 1`` is plain
conditional sampling (one pass per step).

This file is source text for export: nothing in ``unet`` imports it.
"""

from typing import List, Optional, Union

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor


def guided_output(cond, uncond, scale, channels):
    """The guided model output: mean channels extrapolated from ``uncond`` towards ``cond`` by
    ``scale``, any further (variance) channels from ``cond``."""
    mean = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([mean, cond[:, channels:]], dim=1)


class ClassConditionalDDPMPipeline(DiffusionPipeline):
    """
    Sampling from a class-conditional ``UNet2DModel`` with any diffusers scheduler.

    :param unet: the exported U-Net (``num_class_embeds`` set).
    :param scheduler: the exported ``DDPMScheduler`` (learned-range variance where the model
        learned it); ``DDIMScheduler`` / ``DPMSolverMultistepScheduler`` from its config also work.
    :param null_class_label: the label index meaning "no label" (label dropout in training),
        or None when the model was trained without it (then only ``guidance_scale=1`` works).
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler, null_class_label: Optional[int] = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(null_class_label=null_class_label)

    def _model_output(self, x, t, labels, scale):
        channels = self.unet.config.in_channels
        if scale == 1.0:
            return self.unet(x, t, class_labels=labels).sample
        null = torch.full_like(labels, self.config.null_class_label)
        both = self.unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample
        cond, uncond = both.chunk(2)
        return guided_output(cond, uncond, scale, channels)

    def _scheduler_input(self, out):
        # A DDPM scheduler with learned variance reads all 2C channels; the others read the mean part.
        learned = isinstance(self.scheduler, DDPMScheduler) and \
            self.scheduler.config.variance_type in ("learned", "learned_range")
        return out if learned else out[:, :self.unet.config.in_channels]

    @torch.no_grad()
    def __call__(self, class_labels: Union[int, List[int]], guidance_scale: float = 1.0,
                 num_inference_steps: int = 1000, generator: Optional[torch.Generator] = None,
                 output_type: str = "pil", return_dict: bool = True):
        """
        :param class_labels: one label per image (an int gives one image).
        :param guidance_scale: classifier-free guidance weight w >= 0; 1 = conditional sampling.
        :param num_inference_steps: scheduler steps.
        :param output_type: "pil", "np" (NHWC floats in [0, 1]) or "pt" (NCHW in [0, 1]).
        """
        labels = [class_labels] if isinstance(class_labels, int) else list(class_labels)
        num_classes = self.unet.config.num_class_embeds
        if any(not 0 <= c < num_classes or c == self.config.null_class_label for c in labels):
            raise ValueError(f"class labels must be in [0, {num_classes}) and not the null label; got {labels}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if guidance_scale != 1.0 and self.config.null_class_label is None:
            raise ValueError("this model was trained without label dropout, so it has no unconditional "
                             "prediction: classifier-free guidance needs guidance_scale=1")
        size = self.unet.config.sample_size
        shape = (len(labels), self.unet.config.in_channels, size, size)
        x = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        y = torch.tensor(labels, device=self._execution_device)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            out = self._model_output(self.scheduler.scale_model_input(x, t), t, y, guidance_scale)
            x = self.scheduler.step(self._scheduler_input(out), t, x, generator=generator).prev_sample
        images = (x / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return ImagePipelineOutput(images=images) if return_dict else (images,)
        images = images.cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            images = self.numpy_to_pil(images)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
