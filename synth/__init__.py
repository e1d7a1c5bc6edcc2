"""Synthetic grasp-quality datasets: random primitive objects, a four-finger hand, analytic labels.

Writes the seed's processed layout (`<out>/<scene>/scene.npz` with sdf, grasps, scores,
translation, global_scale) with labels that depend on the object's shape and the hand's
configuration, so pipelines and models can be tried without the real data. Numpy only.
"""

from .hand import forward_kinematics
from .scenes import make_scene
from .score import score_grasps
from .writer import format_summary, scene_name, write_scenes

__all__ = ["make_scene", "write_scenes", "format_summary", "scene_name", "score_grasps", "forward_kinematics"]
