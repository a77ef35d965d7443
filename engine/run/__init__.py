"""The run directory and its processes: the typed event log (`events`), the directory every viewer reads
(`rundir`), starting and stopping a detached engine (`launcher`), the engine process itself (`worker`,
with `context`, `monitor` and `ranks`), checks made before a run exists (`preflight`) and a run's
training time (`worktime`). This is the only channel between the engine and the app."""
