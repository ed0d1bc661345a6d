"""Sample images from a trained model: see ``python sample.py --help`` and docs/sampling.md.

    python sample.py --checkpoint outputs/digits --num_samples 64 --scheduler dpm-solver++ --steps 20 --out samples
    accelerate launch --multi_gpu --num_processes 2 sample.py ...   # each process samples its share
"""

from unet.sampling import main

if __name__ == "__main__":
    main()
