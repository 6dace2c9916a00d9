"""The ``eval`` config group."""

from dataclasses import dataclass

from bnn_bench.errors import UserError


@dataclass(frozen=True)
class EvalSettings:
    """How runs are evaluated.

    Attributes:
      batch_size: inputs per forward pass when predicting.
      num_bins: equal-width confidence bins of ECE and the reliability diagram.
      keep_inputs: the first this-many inputs of each set keep every member's
        probabilities (for per-image box plots).
      keep_members: at most this many members are kept for them.
    """

    batch_size: int = 1000
    num_bins: int = 15
    keep_inputs: int = 5
    keep_members: int = 1000

    def __post_init__(self):
        if min(self.batch_size, self.num_bins) < 1 or min(self.keep_inputs, self.keep_members) < 0:
            raise UserError("eval.batch_size and eval.num_bins must be >= 1, "
                            "eval.keep_inputs and eval.keep_members >= 0.")
