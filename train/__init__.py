"""Training: `python -m train.imagenet` (CLI), `train.trainer.train_and_evaluate` (the run),
`train.input_pipeline` (tfds / tf.data), `train.config.Config` (every option and its default)."""
