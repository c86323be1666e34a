"""The multi-view diffusion model family (library, nothing registered): the prior
(:mod:`~guidance.multiview.prior`, the one object guidances use), UNet, cameras, noise maths,
model, OpenCLIP I/O, view targets, SDS loss forms, pretrained lookup, conversion, sampling."""
