"""Training multi-view diffusion models, the toy CLIP and toy point-cloud models (a tool): the
fine-tuning command ``python -m guidance.training`` (config, data, losses, average, loop,
diffusion, clip, points, command) and the toy-model chain
``python -m guidance.training.toy_models``."""
