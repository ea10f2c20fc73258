"""moewatch: a training-health monitor for Mixture-of-Experts routers.

    print(moewatch.inspect(model))                 # the routers it would record, and what each can measure
    watch = moewatch.attach(model, "runs/exp1")   # finds every router, starts recording
    ...; watch.step()                              # after each optimizer step
    watch.close()
    run = moewatch.load("runs/exp1")              # run.experts, run.layers (pandas), run.meta (dict)
"""

__version__ = "0.1.0"

from moewatch.capture.summary import inspect  # noqa: E402
from moewatch.capture.types import Probe, RouterSpec, Routing  # noqa: E402
from moewatch.capture.watch import Watch, WatchConfig, attach  # noqa: E402
from moewatch.store.reader import Run, RunError, load  # noqa: E402

__all__ = [
    "__version__",
    "attach",
    "inspect",
    "load",
    "Watch",
    "WatchConfig",
    "Run",
    "RunError",
    "RouterSpec",
    "Routing",
    "Probe",
]
