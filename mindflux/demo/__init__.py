"""The demo: a procedural shapes dataset and the tiny FLUX pipeline that mindflux trains on it."""
