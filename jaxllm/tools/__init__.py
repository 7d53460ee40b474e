"""Tools for experiments: sweeps, vectorised trials, reproduction, launchers."""
