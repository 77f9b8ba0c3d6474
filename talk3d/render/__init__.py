"""Cameras, rays, EG3D's two-pass sampling, the occupancy grid, and the triplane renderer."""
from .cameras import (FFHQ_DEPTH_RANGE, FFHQ_RIG, TALK3D_RIG, CameraRig, camera_to_yaw_pitch,
                      check_cameras, euler_to_rotation, generate_rays, look_at_camera,
                      make_camera_label, normalized_intrinsics, ray_box_limits, rotation_to_euler,
                      split_camera_label)
from .occupancy_grid import OccupancyGrid, grid_resolution_for
from .renderer import DecoderWeights, RenderConfig, Renderer, RenderOutput, RenderRandoms, render
from .sampling import importance_depths, stratified_depths

__all__ = [
    "CameraRig", "FFHQ_RIG", "TALK3D_RIG", "FFHQ_DEPTH_RANGE", "check_cameras", "make_camera_label",
    "split_camera_label", "normalized_intrinsics", "look_at_camera", "camera_to_yaw_pitch",
    "euler_to_rotation", "rotation_to_euler", "generate_rays", "ray_box_limits",
    "OccupancyGrid", "grid_resolution_for", "DecoderWeights", "RenderConfig", "RenderRandoms", "RenderOutput", "Renderer",
    "render", "stratified_depths", "importance_depths",
]
