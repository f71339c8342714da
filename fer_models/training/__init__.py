"""Training and evaluation: data readers, batch augmentation, the training loop (single process or DDP),
evaluation and metrics, model cards and Hub publishing. The CLIs are ``python -m fer_models.train`` /
``.evaluate`` / ``.publish``."""
