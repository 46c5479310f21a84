"""Training: mesh and sharding, state, the train step, the trainer loop, its metric writers, and the step benchmark (speed)."""
