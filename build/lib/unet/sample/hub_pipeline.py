"""
The pipeline that ``python -m unet.export`` writes beside a class-conditional model as
``pipeline.py``. It imports only ``torch`` and ``diffusers``, so a user without this package
generates by class label with stock libraries:

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("exported/digits", custom_pipeline="exported/digits",
                                             trust_remote_code=True)  # runs this file, copied there
    images = pipe(class_labels=[0, 1, 2, 3], guidance_scale=2.0, num_inference_steps=100).images

Classifier-free guidance (Ho & Salimans 2022): for a model trained with label dropout, whose
last class embedding is the "no label" class, the mean channels of the output become
``uncond + w * (cond - uncond)``; learned-variance channels are taken from the conditional
pass, as improved-DDPM's sampler needs the model's own variance. ``w = 1`` is plain
conditional sampling (one pass per step).

This file is copied into every class-conditional export as ``pipeline.py``, with
``guidance.py`` beside it (the two rules, ``guided_output`` and ``scheduler_input``, which
``unet.sample.sampling`` uses too, so the package and the exported pipeline sample by the same code);
so neither may import anything from ``unet`` but each other.
"""

import math

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from .guidance import guided_output, scheduler_input  # guidance.py, beside this file in an export


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

    def __init__(self, unet: UNet2DModel, scheduler, null_class_label: int | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(null_class_label=null_class_label)

    def _model_output(self, x, t, labels, scale):
        channels = self.unet.config.in_channels
        if scale == 1:
            return self.unet(x, t, class_labels=labels).sample
        null = torch.full_like(labels, self.config.null_class_label)
        both = self.unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample
        cond, uncond = both.chunk(2)
        return guided_output(cond, uncond, scale, channels)

    @torch.no_grad()
    def __call__(self, class_labels: int | list[int], guidance_scale: float = 1.0,
                 num_inference_steps: int = 1000, generator: torch.Generator | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        """
        :param class_labels: one label per image: a list, tensor or array, or an int for one image.
        :param guidance_scale: classifier-free guidance weight w >= 0; 1 = conditional sampling.
        :param num_inference_steps: scheduler steps.
        :param output_type: "pil", "np" (NHWC floats in [0, 1]) or "pt" (NCHW in [0, 1]).
        """
        labels = torch.as_tensor(class_labels).reshape(-1).tolist()
        null = self.config.null_class_label
        num_classes = self.unet.config.num_class_embeds if null is None else null  # the real classes
        if not labels or any(not 0 <= c < num_classes for c in labels):
            raise ValueError(f"class labels must be in [0, {num_classes}), one per image; got {labels}")
        if not (math.isfinite(guidance_scale) and guidance_scale >= 0):
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")
        if guidance_scale != 1 and null is None:
            raise ValueError("this model was trained without label dropout, so it has no unconditional "
                             "prediction: classifier-free guidance needs guidance_scale=1")
        size = self.unet.config.sample_size
        shape = (len(labels), self.unet.config.in_channels, size, size)
        x = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        y = torch.tensor(labels, device=self._execution_device)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            out = self._model_output(self.scheduler.scale_model_input(x, t), t, y, guidance_scale)
            out = scheduler_input(out, self.unet.config.in_channels, self.scheduler)
            x = self.scheduler.step(out, t, x, generator=generator).prev_sample
        images = (x / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return ImagePipelineOutput(images=images) if return_dict else (images,)
        images = images.cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            images = self.numpy_to_pil(images)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
