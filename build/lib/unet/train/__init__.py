"""Training (the config is ``unet.config``'s, the data ``unet.data``'s): the model factory, setup (the
Accelerator, optimizer), the loop (``loop.train``), its state and rules (``state``),
diagnostics, tracking, preemption, and the run folder with checkpoints and resume
(``checkpoint``; what a checkpoint holds and ``load_checkpoint`` are ``unet.checkpoint``'s)."""
