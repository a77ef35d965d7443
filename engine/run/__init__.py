"""The run directory and its processes: the typed event log (`events`), the directory every viewer reads
(`rundir`), starting and stopping a detached engine (`launcher`), the engine process itself (`worker`,
with `context`, `monitor` and `ranks`), checks made before a run exists (`preflight`), a run's training
time (`worktime`) and curves (`curves`), and the coach that turns the engine's metrics into plain-words
alerts (`alerts`, wired in by `coach`). This is the only channel between the engine and the app."""
