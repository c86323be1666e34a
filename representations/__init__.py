"""3D representations, their differentiable renderers, backgrounds and mesh utilities.

Every module here is imported by the registry on first use; plugins register themselves with
``@engine.registry.register``. Import heavy optional libraries (tinycudann, nvdiffrast,
kaolin) inside functions only.
"""
