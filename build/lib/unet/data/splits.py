"""What every data source returns: the train and held-out splits (``ImageData``), and the one
error a data problem raises (``DataError``). Apart from ``dataset`` so that the sources it
dispatches to (``mnist``) need not import it back."""

from dataclasses import dataclass


class DataError(ValueError):
    """Missing, empty or unusable data; its message is the one line the user sees."""


@dataclass
class ImageData:
    """
    :param train: a ``datasets.Dataset`` whose rows are {"image": [C,H,W] float in [-1, 1], "label": int}.
    :param eval: the held-out split in the same format, or None.
    :param num_classes: classes of the label column (0 when there is none).
    :param skipped: corrupt image files left out up front (``verify_images`` parallel).
    """

    train: object
    eval: object
    num_classes: int
    skipped: int

    def skipped_images(self):
        """Corrupt files left out: up front, plus those a lazy split has met so far (in this process)."""
        return self.skipped + sum(len(getattr(p, "bad", ())) for p in (self.train, self.eval))
