"""Multi-view datasets: the on-disk format (mvdataset) and the procedural toy world that writes it; coloured point clouds sampled from meshes (point_clouds)."""
