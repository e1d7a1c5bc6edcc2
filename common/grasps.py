"""The seed's grasp data as every package counts it: the length of a grasp vector, the most grasps of a scene.

Defined here, on the floor every package may import (the torch-only models included), so each has one definition.
"""

GRASP_DIM = 19  # palm position (3) + quaternion xyzw (4) + 12 joint angles (4 fingers x abduction, 2 flexions)
# The seed's most grasps per scene: a record's default grasp slots, and a generated or imported scene's grasps.
SEED_MAX_GRASPS = 480
