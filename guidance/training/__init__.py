"""Training multi-view diffusion models and the toy CLIP (a tool): the fine-tuning command
``python -m guidance.training`` (config, data, losses, average, loop, diffusion, clip,
command) and the toy-model chain ``python -m guidance.training.toy_models``."""
