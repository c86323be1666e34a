"""Point-cloud diffusion (our implementation of OpenAI's Point-E models; library, nothing
registered): the transformer family (:mod:`~guidance.pointcloud.transformer`), the released
diffusion, training loss and Karras/Heun sampler (:mod:`~guidance.pointcloud.diffusion`),
the converter of released checkpoints (:mod:`~guidance.pointcloud.convert`), the folder
format with its loader (:mod:`~guidance.pointcloud.pretrained`), picture -> condition ->
cloud (:mod:`~guidance.pointcloud.picture`), cloud previews
(:mod:`~guidance.pointcloud.preview`) and the ``python -m guidance.pointcloud.sample``
command (:mod:`~guidance.pointcloud.sample`). See docs/pointe.md."""
