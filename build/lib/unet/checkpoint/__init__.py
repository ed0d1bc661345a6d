"""A trained model on disk: what a checkpoint folder holds (``format``: its files, manifest and
training-state schema, checked on every read) and loading a model from it or from an original
improved-diffusion ``.pt`` (``load``). Below sampling, evaluation and training, which all read it;
the run folder and resume stay in ``unet.train.checkpoint``."""
