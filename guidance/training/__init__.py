"""Training multi-view diffusion models and the toy CLIP (a tool: fine-tuning, the toy-model chain)."""
