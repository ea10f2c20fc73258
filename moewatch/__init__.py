"""moewatch: a training-health monitor for Mixture-of-Experts routers.

    print(moewatch.inspect(model))                 # the routers it would record, and what each can measure
    watch = moewatch.attach(model, "runs/exp1")   # finds every router, starts recording
    ...; watch.step()                              # after each optimizer step
    watch.close()
    run = moewatch.load("runs/exp1")              # run.experts, run.layers (pandas), run.meta (dict)
"""

__version__ = "0.1.0"

# The public API, imported on first use: `moewatch report` and `moewatch serve` need neither torch nor the capture
# hooks, and a training script pays for them once, at `moewatch.attach`.
_EXPORTS = {
    "attach": "moewatch.capture.watch",
    "Watch": "moewatch.capture.watch",
    "WatchConfig": "moewatch.capture.watch",
    "inspect": "moewatch.capture.summary",
    "Probe": "moewatch.capture.types",
    "RouterSpec": "moewatch.capture.types",
    "Routing": "moewatch.capture.types",
    "load": "moewatch.store.reader",
    "Run": "moewatch.store.reader",
    "RunError": "moewatch.store.reader",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'moewatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
