"""Point-cloud diffusion (our implementation of OpenAI's Point-E models; library, nothing
registered): the transformer family (:mod:`~guidance.pointcloud.transformer`), the released
diffusion, training loss and Karras/Heun sampler (:mod:`~guidance.pointcloud.diffusion`),
the converter of released checkpoints (:mod:`~guidance.pointcloud.convert`) and the folder
format with its loader (:mod:`~guidance.pointcloud.pretrained`). See docs/pointe.md."""
