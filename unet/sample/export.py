"""
Export a trained model as a diffusers pipeline (``UNet2DModel`` + ``DDPMScheduler``) that
loads and runs with stock ``diffusers`` and ``torch``, without this package:

    python -m unet.export outputs/digits exported/digits

An unconditional model becomes a stock ``DDPMPipeline``. A class-conditional one becomes
``hub_pipeline.ClassConditionalDDPMPipeline``, whose source is copied into the folder as
``pipeline.py`` (diffusers' custom-pipeline mechanism), with classifier-free guidance when
the model was trained with label dropout. Either way the folder gets a ``README.md`` model
card that says how to load it.

The improved-DDPM U-Net maps exactly onto ``UNet2DModel`` with scale-shift time
conditioning, flipped sinusoids, 32-group norms (the mid-block attention's included) and
one attention head width for the whole model; a model outside that gets a one-line error.
"""

import json
import os
import shutil
import tempfile

import numpy as np
import torch
import yaml
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from unet.checkpoint.load import Loaded
from unet.core.diffusion import get_named_beta_schedule, respaced_betas
from unet.core.model import AttentionBlock, Downsample, ResBlock, Upsample

from . import guidance, hub_pipeline
from .sampling import ddpm_variance_type, make_scheduler, scheduler_kwargs


class ExportError(ValueError):
    """A model ``UNet2DModel`` cannot express; the message is one line."""


# --- what UNet2DModel can express ----------------------------------------------------

def head_width(model):
    """The one attention head width of ``model``; ``UNet2DModel`` has a single
    ``attention_head_dim``, so several widths (e.g. a fixed head count at levels of
    different widths) cannot be exported."""
    widths = {}
    for name, m in model.named_modules():
        if isinstance(m, AttentionBlock):
            widths.setdefault(m.qkv.in_channels // m.num_heads, name)
    if len(widths) != 1:
        found = ", ".join(f"{w} (at {n})" for w, n in sorted(widths.items()))
        raise ExportError(
            f"UNet2DModel needs one attention head width for the whole model; this one has {found}: "
            "retrain with num_heads chosen so that channels / num_heads is the same at every attention level"
        )
    return next(iter(widths))


def check_expressible(model, diffusion_kwargs):
    """Raise ``ExportError`` naming the first feature ``UNet2DModel``/``DDPMPipeline`` lacks."""
    if model.norm != "group":
        raise ExportError(f"UNet2DModel always has GroupNorm; this model has norm={model.norm!r}")
    if any(getattr(m, "fixup", False) for m in model.modules()):
        raise ExportError(
            "UNet2DModel has no Fixup scalar biases and multipliers; models with init=fixup cannot be exported"
        )
    if not isinstance(model.input_blocks[0][0], torch.nn.Conv2d):
        raise ExportError("UNet2DModel is 2-D; this model has dims != 2")
    for m in model.modules():
        if (isinstance(m, Downsample) and not isinstance(m.op, torch.nn.Conv2d)) or (
            isinstance(m, Upsample) and not m.use_conv
        ):
            raise ExportError("UNet2DModel resamples with convolutions; this model has conv_resample=False")
        if (
            isinstance(m, ResBlock)
            and isinstance(m.skip_connection, torch.nn.Conv2d)
            and m.skip_connection.kernel_size != (1, 1)
        ):
            raise ExportError("UNet2DModel's residual shortcut is a 1x1 conv; this model uses 3x3 skip convs")
    steps = diffusion_kwargs.get("steps", 1000)
    if diffusion_kwargs.get("rescale_timesteps") and steps % 1000:
        raise ExportError(
            f"this model sees timesteps scaled by 1000/{steps} (rescale_timesteps), and DDPMPipeline calls "
            "the U-Net with the scheduler's step index: only T = 1000, 2000, 3000, ... can be exported"
        )
    head_width(model)


def export_scheduler(diffusion_kwargs):
    """
    The pipeline's ``DDPMScheduler``. A model trained with ``rescale_timesteps`` over T = k * 1000
    steps sees ``t / k``, while DDPMPipeline calls the U-Net with the scheduler's own step
    index; so its process is exported respaced to every k-th step (1000 steps with the same
    alpha-bar there, the respacing improved-diffusion samples with), whose step j is the
    model's step k * j and is exactly the timestep the model was trained to see.
    """
    steps = diffusion_kwargs.get("steps", 1000)
    if not diffusion_kwargs.get("rescale_timesteps") or steps == 1000:
        return make_scheduler("ddpm", diffusion_kwargs)
    alphas_cumprod = np.cumprod(1.0 - get_named_beta_schedule(diffusion_kwargs.get("noise_schedule", "linear"), steps))
    betas = respaced_betas(alphas_cumprod, range(0, steps, steps // 1000))
    kwargs = {k: v for k, v in scheduler_kwargs(diffusion_kwargs).items() if not k.startswith("beta_")}
    return DDPMScheduler(**{**kwargs, "num_train_timesteps": 1000}, trained_betas=betas.tolist(),
                         variance_type=ddpm_variance_type(diffusion_kwargs), clip_sample=True)


def unet2d_config(model_kwargs, image_size, model):
    """``UNet2DModel`` arguments equivalent to our ``UNetModel(**model_kwargs)``."""
    mc, mult = model_kwargs["model_channels"], tuple(model_kwargs.get("channel_mult", (1, 2, 4, 8)))
    attn = set(model_kwargs.get("attention_resolutions", ()))
    attn_level = [2 ** level in attn for level in range(len(mult))]
    return dict(
        sample_size=image_size, in_channels=model_kwargs["in_channels"], out_channels=model_kwargs["out_channels"],
        block_out_channels=tuple(mc * m for m in mult), layers_per_block=model_kwargs["num_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn_level),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn_level)),
        # improved-DDPM's embedding is [cos, sin] of t * 10000^(-i/half): flipped, no shift.
        flip_sin_to_cos=True, freq_shift=0, time_embedding_type="positional",
        resnet_time_scale_shift="scale_shift" if model_kwargs.get("use_scale_shift_norm") else "default",
        attention_head_dim=head_width(model), norm_num_groups=32, attn_norm_num_groups=32, norm_eps=1e-5,
        dropout=float(model_kwargs.get("dropout", 0.0)), act_fn="silu", downsample_padding=1,
        num_class_embeds=model_kwargs.get("num_classes"),
    )


# --- weights -------------------------------------------------------------------------

def _res(ours, theirs):
    names = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
    return {f"{ours}.{a}": f"{theirs}.{b}" for a, b in names.items()}


def module_map(model):
    """Our module prefixes -> ``UNet2DModel``'s, walking the blocks in order (a level
    ends at its Downsample / Upsample), and the attention blocks kept apart for ``qkv``."""
    pairs = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "label_emb": "class_embedding", "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out",
             "out.2": "conv_out"}
    attention = {}

    def walk(blocks, prefix, side, start=0):
        level, i = 0, 0
        for b, block in enumerate(blocks, start):
            for j, m in enumerate(block):
                ours = f"{prefix}.{b}.{j}"
                if isinstance(m, ResBlock):
                    pairs.update(_res(ours, f"{side}.{level}.resnets.{i}"))
                elif isinstance(m, AttentionBlock):
                    attention[ours] = f"{side}.{level}.attentions.{i}"
                elif isinstance(m, Downsample):
                    pairs[f"{ours}.op"] = f"{side}.{level}.downsamplers.0.conv"
                elif isinstance(m, Upsample):
                    pairs[f"{ours}.conv"] = f"{side}.{level}.upsamplers.0.conv"
            if any(isinstance(m, (Downsample, Upsample)) for m in block):
                level, i = level + 1, 0
            else:
                i += 1

    walk(model.input_blocks[1:], "input_blocks", "down_blocks", start=1)  # [0] is conv_in
    walk(model.output_blocks, "output_blocks", "up_blocks")
    pairs.update(_res("middle_block.0", "mid_block.resnets.0"))
    pairs.update(_res("middle_block.2", "mid_block.resnets.1"))
    attention["middle_block.1"] = "mid_block.attentions.0"
    return pairs, attention


def to_diffusers_state_dict(model):
    """Our state dict under ``UNet2DModel``'s names. ``qkv`` holds per head [q_h; k_h; v_h]
    (not [q; k; v]), so it is split as (heads, 3, head_dim, C)."""
    sd = model.state_dict()
    pairs, attention = module_map(model)
    out = {}
    for key, value in sd.items():
        prefix, _, param = key.rpartition(".")
        if prefix in pairs:
            out[f"{pairs[prefix]}.{param}"] = value
    for ours, theirs in attention.items():
        block = model.get_submodule(ours)
        c, h = block.qkv.in_channels, block.num_heads
        w = sd[f"{ours}.qkv.weight"].reshape(h, 3, c // h, c)
        b = sd[f"{ours}.qkv.bias"].reshape(h, 3, c // h)
        for k, name in enumerate(("to_q", "to_k", "to_v")):
            out[f"{theirs}.{name}.weight"] = w[:, k].reshape(c, c)
            out[f"{theirs}.{name}.bias"] = b[:, k].reshape(c)
        out[f"{theirs}.to_out.0.weight"] = sd[f"{ours}.proj_out.weight"].squeeze(-1)
        out[f"{theirs}.to_out.0.bias"] = sd[f"{ours}.proj_out.bias"]
        out[f"{theirs}.group_norm.weight"] = sd[f"{ours}.norm.weight"]
        out[f"{theirs}.group_norm.bias"] = sd[f"{ours}.norm.bias"]
    return out


def to_unet2d(loaded):
    """A ``UNet2DModel`` with the same function as ``loaded.model``."""
    check_expressible(loaded.model, loaded.diffusion_kwargs)
    unet = UNet2DModel(**unet2d_config(loaded.model_kwargs, loaded.image_size, loaded.model))
    unet.load_state_dict(to_diffusers_state_dict(loaded.model), strict=True)
    return unet.eval()


@torch.no_grad()
def max_output_difference(loaded, unet, batch=2, seed=0):
    """Largest |ours - theirs| over random inputs at random steps (labels if conditional)."""
    g = torch.Generator().manual_seed(seed)
    c, s = loaded.model.in_channels, loaded.image_size
    x = torch.randn(batch, c, s, s, generator=g)
    t = torch.randint(loaded.diffusion_kwargs.get("steps", 1000), (batch,), generator=g)
    y = None if loaded.model.num_classes is None else torch.randint(loaded.model.num_classes, (batch,), generator=g)
    ours = loaded.model(x, t, **({} if y is None else {"y": y}))
    theirs = unet(x, t, class_labels=y).sample
    return (ours - theirs).abs().max().item()


def check_out_dir(out_dir: str) -> None:
    """Refuse, before any work, an output path that is a file or a folder that cannot be written."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"the output {out_dir} is a file; give a folder (it is created if missing)")
    parent = out_dir if os.path.isdir(out_dir) else os.path.dirname(os.path.abspath(out_dir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write the output folder {out_dir}: {parent} is not a writable folder")


def build_pipeline(loaded, unet):
    """``DDPMPipeline`` for an unconditional model, else the class-conditional pipeline with
    the null label of label dropout (None without it: no guidance)."""
    scheduler = export_scheduler(loaded.diffusion_kwargs)
    if loaded.model.num_classes is None:
        return DDPMPipeline(unet=unet, scheduler=scheduler)
    return hub_pipeline.ClassConditionalDDPMPipeline(unet=unet, scheduler=scheduler,
                                                     null_class_label=loaded.null_label)


def export_pipeline(loaded: Loaded, out_dir: str, tolerance: float = 1e-4, quality: "list[dict] | None" = None,
                    repo_id: "str | None" = None, written: "list[str] | None" = None) -> float:
    """
    Write ``out_dir`` (``model_index.json``, ``unet/``, ``scheduler/``, ``README.md``, and
    ``pipeline.py`` for a class-conditional model), after checking that the converted U-Net
    computes what ours does.

    :param quality: rows of ``evaluate.py benchmark --json`` for the model card, if measured
        (one per run: ``summarize_seeds`` rows where several seeds were measured).
    :param repo_id: the hub repository it will be pushed to: the card's snippet loads it from there.
    :param written: a list the paths this export wrote (relative to ``out_dir``) are appended to:
        what a push uploads, and nothing else that lies in the folder.
    :return: the measured largest output difference.
    """
    check_out_dir(out_dir)
    unet = to_unet2d(loaded)
    diff = max_output_difference(loaded, unet)
    if not diff <= tolerance:
        raise ExportError(f"the converted U-Net differs from ours by {diff:.3g} (> {tolerance:g}); nothing written")
    pipe = build_pipeline(loaded, unet)
    os.makedirs(out_dir, exist_ok=True)
    files = save_listed(pipe, out_dir)
    code = {"pipeline.py": hub_pipeline.__file__, "guidance.py": guidance.__file__}  # pipeline.py imports .guidance
    for name, source in code.items():
        path = os.path.join(out_dir, name)
        if not isinstance(pipe, DDPMPipeline):
            shutil.copyfile(source, path)
            files.append(name)
        elif os.path.exists(path):  # an earlier class-conditional export into the same folder
            os.remove(path)
    hub_card(loaded, model_card(loaded, repo_id or out_dir, diff, quality)).save(os.path.join(out_dir, "README.md"))
    if written is not None:
        written.extend(sorted([*files, "README.md"]))
    return diff


def save_listed(pipe, out_dir: str) -> list:
    """``pipe.save_pretrained`` into a fresh folder inside ``out_dir``, each file then moved into
    place: the list of what diffusers wrote (relative paths), whatever else ``out_dir`` holds."""
    tmp = tempfile.mkdtemp(prefix=".export-", dir=out_dir)
    try:
        pipe.save_pretrained(tmp)
        files = sorted(os.path.relpath(os.path.join(d, f), tmp) for d, _, fs in os.walk(tmp) for f in fs)
        for rel in files:
            os.makedirs(os.path.dirname(os.path.join(out_dir, rel)) or out_dir, exist_ok=True)
            os.replace(os.path.join(tmp, rel), os.path.join(out_dir, rel))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files


# --- the model card ------------------------------------------------------------------

# Config keys that hold paths on the training machine: never in a card.
LOCAL_PATH_KEYS = ("output_dir", "data_dir", "cache_dir", "fid_ref", "resume")


def hub_dataset(cfg: "dict | None") -> bool:
    """Whether the config's dataset is a hub dataset (``user/name``), not a local folder."""
    name = str((cfg or {}).get("dataset", ""))
    return "/" in name and not os.path.isabs(name) and not name.startswith(".") and not os.path.exists(name)


def hub_card(loaded, text):
    """``text`` as a ``huggingface_hub.ModelCard`` whose metadata the hub reads: diffusers as
    the library, unconditional image generation (the hub's tag for a pipeline without a text
    prompt; class labels are an optional input), and tags saying what the model is."""
    from huggingface_hub import ModelCard, ModelCardData

    cfg = loaded.config
    tags = ["diffusers", "improved-ddpm", "unet2d", "ddpm",
            "unconditional" if loaded.model.num_classes is None else "class-conditional"]
    data = ModelCardData(library_name="diffusers", pipeline_tag="unconditional-image-generation", tags=tags,
                         license="mit", datasets=[cfg["dataset"]] if hub_dataset(cfg) else None)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}")


class PushError(RuntimeError):
    """A push to the hub that failed (no token, no network, refused); the message is one line."""


NO_TOKEN = "no Hugging Face token (run `hf auth login` or set HF_TOKEN)"


def missing_token() -> bool:
    """No Hugging Face token is found (``huggingface_hub.get_token``): a push cannot happen."""
    from huggingface_hub import get_token

    return not get_token()


def push_to_hub(out_dir: str, repo_id: str, files: list, private: bool = False) -> str:
    """
    Upload the files an export wrote into ``out_dir`` to the hub repository ``repo_id`` (created
    if missing) with ``huggingface_hub``: ``create_repo`` then ``upload_folder`` restricted to
    ``files`` (anything else in the folder, a ``.env`` or notes, stays local).

    :param files: the paths, relative to ``out_dir``, that ``export_pipeline`` wrote.

    :param private: create the repository private (an existing one keeps its visibility).
    :return: the repository's URL.
    """
    from huggingface_hub import HfApi

    if missing_token():
        raise PushError(f"{NO_TOKEN}: the export is in {out_dir}, not pushed")
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=out_dir, repo_type="model", allow_patterns=list(files),
                          commit_message="Upload an improved-DDPM U-Net exported by the unet package")
    except Exception as e:  # offline, refused, rate-limited: one line, the local folder stays
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PushError(f"push to {repo_id} failed ({type(e).__name__}: {msg}): the export is in {out_dir}") from None
    return str(url)


def usage_lines(loaded, out_dir):
    """The three lines that generate from the export with stock diffusers (a labelled grid,
    one row per repeat of the classes, for a class-conditional model)."""
    if loaded.model.num_classes is None:
        return ["from diffusers import DDPMPipeline",
                f"pipe = DDPMPipeline.from_pretrained({out_dir!r})",
                "pipe(batch_size=16, num_inference_steps=100).images[0].save('sample.png')"]
    null = loaded.null_label
    classes = loaded.model.num_classes if null is None else null
    guidance = ", guidance_scale=2.0" if null is not None else ""
    resize = ", resize=64" if loaded.image_size < 64 else ""  # small images: a grid big enough to see
    return ["import diffusers",
            f"pipe = diffusers.DiffusionPipeline.from_pretrained({out_dir!r}, custom_pipeline={out_dir!r}, "
            "trust_remote_code=True)",
            f"diffusers.utils.make_image_grid(pipe(class_labels=list(range({classes})) * 2{guidance}, "
            f"num_inference_steps=100).images, rows=2, cols={classes}{resize}).save('grid.png')"]


def quality_table(rows):
    """Markdown table of ``evaluate.py benchmark`` rows (accuracy "-" where not measured: unconditional models)."""
    lines = [
        "| sampler | steps | guidance | Frechet distance (real floor) | accuracy | images/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = r.get("accuracy")
        lines.append(
            f"| {r['scheduler']} | {r['steps']} | {r.get('guidance_scale', 1):g} | {r['fd']:.2f} "
            f"({r['fd_floor']:.2f}) | {'-' if acc is None or acc != acc else f'{acc:.3f}'} | {r['images_per_s']:.1f} |"
        )
    return "\n".join(lines)


def model_card(loaded, out_dir, diff, quality=None):
    """``README.md`` of an export: architecture, training config, how to generate, quality."""
    m, null = loaded.model, loaded.null_label
    kind = ("unconditional" if m.num_classes is None else
            f"class-conditional ({m.num_classes if null is None else null} classes"
            + (f", trained with label dropout: classifier-free guidance, null label {null})" if null is not None
               else "; trained without label dropout, so no guidance)"))
    params = sum(p.numel() for p in m.parameters())
    arch = {k: list(v) if isinstance(v, tuple) else v for k, v in loaded.model_kwargs.items()}
    config = (  # without the training machine's paths: a card is public
        {k: v for k, v in loaded.config.items() if k not in LOCAL_PATH_KEYS} if loaded.config is not None
        else {"model": arch, "diffusion": loaded.diffusion_kwargs}
    )
    text = [
        f"# {os.path.basename(os.path.normpath(out_dir))}: an improved-DDPM U-Net, {kind}",
        "",
        f"{params:,} parameters, {loaded.image_size}x{loaded.image_size} images with {m.in_channels} channel(s), "
        f"{loaded.diffusion_kwargs.get('steps', 1000)} diffusion steps "
        f"({loaded.diffusion_kwargs.get('noise_schedule', 'linear')} schedule), "
        f"{'learned' if loaded.diffusion_kwargs.get('learn_sigma') else 'fixed'} variance. Exported by the `unet` "
        f"package as a diffusers `UNet2DModel` (largest output difference to the original model: {diff:.2g}).",
        "",
        "## Generate (needs only `torch` and `diffusers`)",
        "",
        "```python",
        *usage_lines(loaded, out_dir),
        "```",
        "",
        "## Architecture (`UNetModel` arguments)",
        "",
        "```json",
        json.dumps(arch, indent=1),
        "```",
        "",
        "## Training configuration",
        "",
        "```yaml",
        yaml.safe_dump(config, sort_keys=False).strip(),
        "```",
        "",
        "## Measured quality",
        "",
    ]
    if quality:
        seeds = max(len(r.get("seeds") or [r.get("seed")]) for r in quality)
        text += [quality_table(quality), "", "Frechet distance in a digit classifier's features against held-out "
                 "real digits; accuracy: the classifier agrees with the requested label (`python -m unet.evaluate "
                 "benchmark`)" + (f"; means over {seeds} seeds." if seeds > 1 else ".")]
    else:
        text += ["Not measured at export; `python evaluate.py benchmark --checkpoint CHECKPOINT` measures it "
                 "for digits, and `export.py --quality rows.json` puts its `--json` rows here."]
    return "\n".join(text) + "\n"
