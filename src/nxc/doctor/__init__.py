"""nxc-doctor: what this machine can run, and what a build needs that it lacks (see nxc.doctor.cli)."""
