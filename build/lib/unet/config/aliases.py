"""
The names other training scripts use for keys this config has: diffusers' ``train_unconditional.py``
and improved-diffusion's ``image_train.py``. Where the meaning is the same, the name is accepted and
one line says what it maps to; where it differs (a per-device batch against this global one, a
micro-batch against gradient accumulation), it is refused with the conversion.
"""

ALIASES = {
    # diffusers' training scripts
    "resolution": "image_size",
    "learning_rate": "lr",
    "lr_scheduler": "lr_schedule",
    "lr_warmup_steps": "warmup_steps",
    "gradient_accumulation_steps": "grad_accum",
    "checkpointing_steps": "checkpoint_every",
    "checkpoints_total_limit": "keep_checkpoints",
    "resume_from_checkpoint": "resume",
    "max_train_steps": "max_steps",
    "adam_weight_decay": "weight_decay",
    "adam_epsilon": "adam_eps",
    "train_data_dir": "data_dir",
    "dataset_name": "dataset",
    "ddpm_num_steps": "diffusion_steps",
    "logger": "report_to",
    "dataloader_num_workers": "num_workers",
    # improved-diffusion's image_train.py
    "num_channels": "model_channels",
    "resume_checkpoint": "resume",
    "save_interval": "checkpoint_every",
    "log_interval": "log_every",
    "ema_rate": "ema_rates",
    "use_fp16": "mixed_precision",
}

# Boolean aliases whose key here takes a word: alias -> {their boolean: this config's value}.
VALUE_MAPS = {"use_fp16": {True: "fp16", False: "no"}}

REFUSED = {
    "train_batch_size": "'train_batch_size' is per device in diffusers' scripts, while 'batch_size' here is the "
                        "global batch of one optimizer step: set batch_size = train_batch_size x the number of "
                        "processes (grad_accum then splits it)",
    "microbatch": "'microbatch' (improved-diffusion) splits each batch into chunks to save memory; here set "
                  "grad_accum = batch_size / microbatch with the same batch_size",
    "use_ema": "'use_ema': an EMA is always kept here; 'ema_rates' sets its rates (sample.py uses the first)",
    "num_epochs": "'num_epochs': runs are measured in steps here; set max_steps (an epoch is the number of "
                  "training images / batch_size steps)",
}


def alias_of(key):
    """(this config's key, its ``VALUE_MAPS`` table or None) for an alias; raises ValueError with
    the conversion for a name whose meaning differs; None for a name that is not an alias."""
    if key in REFUSED:
        raise ValueError(REFUSED[key])
    return (ALIASES[key], VALUE_MAPS.get(key)) if key in ALIASES else None
