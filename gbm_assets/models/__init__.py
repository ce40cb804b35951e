"""Pure Keras models: variant registry, encoders, losses, augmentation, tf.data input (no Dagster)."""
