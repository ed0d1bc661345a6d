"""Train an improved-DDPM U-Net.

    accelerate launch train.py                                # digits on this machine, offline
    accelerate launch train.py --config configs/cifar10.yaml  # the paper's CIFAR-10 setup
    accelerate launch train.py --resume latest --max_steps 6000

Every config key can be given as --key value (see --help). Exit codes: 0 done, 2 bad
configuration (also a resume that changes a fixed key, or a fresh run into an output_dir
that holds checkpoints), 1 data/checkpoint/setup error, 3 stopped on non-finite or diverging
loss, 75 stopped by SIGTERM/SIGUSR1 after writing a checkpoint (requeue with --resume auto)."""

import sys

from unet.config import ConfigError, help_text, load_config


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if "-h" in argv or "--help" in argv:
            print(help_text([a for a in argv if a not in ("-h", "--help")]))
            return 0
        cfg = load_config(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Imported only now so that a bad flag is reported without loading torch.
    from unet.data.dataset import DataError
    from unet.train.checkpoint import CheckpointError
    from unet.train.loop import TrainingError, train
    from unet.train.preemption import PREEMPTED_EXIT

    try:
        summary = train(cfg, stop_signals=True)
    except ConfigError as e:  # found only against the output_dir or the checkpoint
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summary["stop_reason"] == "preempted":
        print(f"stopped by {summary['signal']} at step {summary['steps']}; checkpoint: {summary['checkpoint']}; "
              "continue with --resume auto", file=sys.stderr)
        return PREEMPTED_EXIT
    if summary["diverged"]:
        print(f"error: training stopped at step {summary['steps']}: {summary['divergence_reason']}; "
              f"last good checkpoint: {summary['checkpoint'] or 'none'}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
