"""Training: mesh and sharding, state, the train step, the trainer loop and checkpoints."""
