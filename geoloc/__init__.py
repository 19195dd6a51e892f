"""geoloc: single-image geolocalization on H3 cells."""

import os

__version__ = "0.1.0"

# OpenMP's default wait policy spins idle threads between parallel regions: on a machine whose
# cores are busy with other work, torch's two threads on two cores then ran a training epoch
# ~40x slower than with threads that sleep (benchmarks/bench_omp_wait.py). It is read once,
# when torch loads its OpenMP runtime, so it is set here, before any geoloc module imports
# torch; a value in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
