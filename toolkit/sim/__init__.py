"""Built-in simulator: pybullet, CPU TinyRenderer, two Franka Panda arms, head camera."""
