"""
The names other training scripts use (diffusers' ``train_unconditional.py``, improved-diffusion's
``image_train.py``). Those whose meaning is the same are declared with the key they name
(``key(..., aliases=...)`` in ``train_config``) and read as it, with one line saying so. These
differ in meaning (a per-device batch against this global one, a micro-batch against gradient
accumulation) and are refused with the conversion.
"""

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
