"""Evaluate a model or its samples: ``python evaluate.py {bpd,loss,quality,ref,fid,benchmark,summary}``;
see ``--help``. Installed as ``unet-evaluate``; the command line itself is ``unet/cli/evaluate.py``."""

import sys

from unet.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
