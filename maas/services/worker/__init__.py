"""worker: owns devices, loads the models the scheduler assigns, serves Inference."""
