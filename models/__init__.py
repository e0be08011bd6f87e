"""Models: importing into the BentoML model store, the served-model configuration, chat templates."""
