//! NF4 checkpoints (in progress).
