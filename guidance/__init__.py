"""Score sources: SDS maths, multi-view diffusion guidance, conditioners, reference losses.

Every module here is imported by the registry on first use; plugins register themselves with
``@engine.registry.register``. Import heavy optional libraries inside functions only.
"""
