"""flexmoe's benchmarks: the harness that runs matrices of runs and reports them, and the
scripts of single measurements. Run from the repository's root, e.g.
``python -m benchmarks.bench --matrix default``."""
