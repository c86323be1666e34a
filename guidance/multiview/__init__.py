"""The multi-view diffusion model family (library): UNet, cameras, noise maths, model, pretrained lookup, conversion, sampling."""
