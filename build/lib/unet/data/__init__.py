"""A config's images: the sources and their checks, the step-seeded batch order and the held-out
split (``dataset``), what every source returns (``splits``), the MNIST family (``mnist``) and
data read as a stream (``streaming``). Below training, the ablation and evaluation, which all read it."""
